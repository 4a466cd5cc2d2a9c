/* err.h — error codes and the per-thread error message.
 *
 * Every fallible function in mtnlg returns 0 (MT_OK) or a negative MT_E* code
 * and, on failure, leaves a message for its caller with mt_seterr(). The
 * message is per thread, so device threads never see each other's errors.
 * Nothing here may exit or abort: the caller decides what a failure means.
 */
#ifndef MT_ERR_H
#define MT_ERR_H

#include <stdarg.h>
#include <stddef.h>

enum {
  MT_OK = 0,
  MT_EINVAL = -1,   /* bad argument, config or input */
  MT_ENOMEM = -2,   /* allocation failed */
  MT_EIO = -3,      /* file or device I/O failed */
  MT_ECORRUPT = -4, /* data failed a format or checksum check */
  MT_ENOTSUP = -5,  /* valid request this build or device cannot do */
  MT_ETIMEDOUT = -6,
  MT_ENOENT = -7,
  MT_ECANCELED = -8, /* the operation was aborted (mt_comm_abort) */
  MT_EPERM = -9,     /* refused: a wrong or missing key */
  MT_EAGAIN = -10,   /* every rank failed alike on what may pass (storage that could not
                        be read): worth another try, unlike MT_EIO not a lost peer */
};

/* Records a printf-style message for the calling thread and returns code,
 * so error paths read `return mt_seterr(MT_EIO, "ckpt: open %s: %s", ...)`. */
int mt_seterr(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int mt_vseterr(int code, const char *fmt, va_list ap);

/* Prefixes the current message: "outer: inner". Returns code. */
int mt_wraperr(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The calling thread's last message ("" if none). Valid until the next mt_seterr. */
const char *mt_errmsg(void);

/* 1 when a failure with this code may pass on another try of the same job:
 * a peer or the network (a collective that failed, timed out or was
 * aborted) or storage that every rank failed to read alike. The node daemon
 * re-forms on such a failure and otherwise ends the job as failed on its own
 * (exit 2, not restarted); mtnlgd --standalone exits 1 and 2 the same way. */
int mt_err_retryable(int code);

/* Short name of a code, e.g. "EINVAL". */
const char *mt_strerror(int code);

/* Cuts s (a message of at most size - 1 bytes, copied into a buffer of
 * size) at a whole UTF-8 character: a sequence a bounded copy cut short
 * would make every JSON that carries the message fail. */
void mt_msg_cut_whole(char *s, size_t size);

/* Copies the calling thread's message into buf (size bytes), cut at a whole
 * character: a message kept before a call that may fail too overwrites it. */
void mt_errmsg_keep(char *buf, size_t size);

#endif
