/* notify.h — the daemon's notifications to systemd (sd_notify: READY=1,
 * STATUS=, WATCHDOG=1, STOPPING=1), sent from a thread of their own.
 *
 * sd_notify writes a datagram to PID 1's socket and blocks while that
 * socket's queue is full: a PID 1 held up (a daemon-reload on a large host)
 * would hold whichever thread sent it, a rank's step or the loop that sends
 * the heartbeats. So no caller ever sends: each call records what is to be
 * said and returns, and the notifier's thread says it. A STATUS= replaces
 * one not yet sent (only the newest state is worth telling), and a flag
 * already pending is not said twice. Never fails a caller and never
 * exits; without NOTIFY_SOCKET (not under systemd) nothing is sent.
 */
#ifndef MT_NOTIFY_H
#define MT_NOTIFY_H

typedef struct mt_notify mt_notify;

/* The flags, said in this order when several are pending: READY before
 * the status it comes with, STOPPING last. */
enum {
  MT_NOTIFY_READY = 1,    /* READY=1 */
  MT_NOTIFY_WATCHDOG = 2, /* WATCHDOG=1 */
  MT_NOTIFY_STOPPING = 4, /* STOPPING=1 */
};

/* A notifier and its thread; NULL if the thread cannot start (then every
 * call below takes NULL and does nothing). */
mt_notify *mt_notify_new(void);

/* Queue one or more MT_NOTIFY_* flags. */
void mt_notify_flags(mt_notify *nt, int flags);

/* Queue "STATUS=<text>" (printf format; cut at 1 KiB), in place of a
 * status not yet sent. */
void mt_notify_status(mt_notify *nt, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Says what is pending, waiting at most wait_ms for it, and frees nt. A
 * thread still held in sd_notify past that is left to finish and free it
 * (the process is ending). */
void mt_notify_free(mt_notify *nt, int wait_ms);

/* The datagrams the notifier has sent, for tests. */
unsigned long mt_notify_sent(const mt_notify *nt);

#endif
