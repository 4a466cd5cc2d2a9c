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
