#include "err.h"

#include <stdio.h>
#include <string.h>

#define MT_ERRMSG_MAX 8192

static _Thread_local char errmsg[MT_ERRMSG_MAX];

int mt_vseterr(int code, const char *fmt, va_list ap) {
  vsnprintf(errmsg, sizeof errmsg, fmt, ap);
  return code;
}

int mt_seterr(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  mt_vseterr(code, fmt, ap);
  va_end(ap);
  return code;
}

int mt_wraperr(int code, const char *fmt, ...) {
  char inner[MT_ERRMSG_MAX];
  va_list ap;
  memcpy(inner, errmsg, sizeof inner);
  va_start(ap, fmt);
  int n = vsnprintf(errmsg, sizeof errmsg, fmt, ap);
  va_end(ap);
  /* append ": inner", cut to fit (the message is for people; truncation is fine) */
  if (n >= 0 && (size_t)n < sizeof errmsg - 2) {
    size_t off = (size_t)n, room = sizeof errmsg - off - 1;
    errmsg[off++] = ':', errmsg[off++] = ' ', room -= 2;
    size_t len = strnlen(inner, room);
    memcpy(errmsg + off, inner, len);
    errmsg[off + len] = 0;
  }
  return code;
}

const char *mt_errmsg(void) { return errmsg; }

int mt_err_retryable(int code) {
  return code == MT_EIO || code == MT_ETIMEDOUT || code == MT_ECANCELED || code == MT_EAGAIN;
}

const char *mt_strerror(int code) {
  switch (code) {
  case MT_OK: return "OK";
  case MT_EINVAL: return "EINVAL";
  case MT_ENOMEM: return "ENOMEM";
  case MT_EIO: return "EIO";
  case MT_ECORRUPT: return "ECORRUPT";
  case MT_ENOTSUP: return "ENOTSUP";
  case MT_ETIMEDOUT: return "ETIMEDOUT";
  case MT_ENOENT: return "ENOENT";
  case MT_ECANCELED: return "ECANCELED";
  case MT_EPERM: return "EPERM";
  case MT_EAGAIN: return "EAGAIN";
  default: return "EUNKNOWN";
  }
}

void mt_msg_cut_whole(char *s, size_t size) {
  size_t len = strlen(s), lead = len;
  if (!size || len != size - 1) return; /* not filled: nothing was cut */
  while (lead && ((unsigned char)s[lead - 1] & 0xC0) == 0x80) lead--;
  if (!lead--) return;
  unsigned char b = (unsigned char)s[lead];
  size_t want = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1;
  if (len - lead < want) s[lead] = 0; /* the last character is cut short */
}

void mt_errmsg_keep(char *buf, size_t size) {
  if (!size) return;
  snprintf(buf, size, "%s", mt_errmsg());
  mt_msg_cut_whole(buf, size);
}
