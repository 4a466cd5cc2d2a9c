/* stderr_capture.h — what a test's code writes to stderr (mt_log's lines),
 * read back: from stderr_capture_begin to stderr_capture_end stderr goes to
 * a temporary file, whose text the end returns with stderr put back. */
#ifndef MT_STDERR_CAPTURE_H
#define MT_STDERR_CAPTURE_H

#include <stdio.h>
#include <unistd.h>

typedef struct stderr_capture {
  FILE *f;
  int saved; /* the real stderr, dup'ed */
} stderr_capture;

/* 0, or -1 when stderr cannot be moved (nothing changed then). */
static inline int stderr_capture_begin(stderr_capture *c) {
  fflush(stderr);
  c->f = tmpfile();
  c->saved = c->f ? dup(STDERR_FILENO) : -1;
  if (c->saved < 0 || dup2(fileno(c->f), STDERR_FILENO) < 0) {
    if (c->saved >= 0) close(c->saved);
    if (c->f) fclose(c->f);
    return -1;
  }
  return 0;
}

/* What was written since the begin, into buf (cap bytes, cut there). */
static inline char *stderr_capture_end(stderr_capture *c, char *buf, size_t cap) {
  fflush(stderr);
  dup2(c->saved, STDERR_FILENO);
  close(c->saved);
  size_t n = fseek(c->f, 0, SEEK_SET) ? 0 : fread(buf, 1, cap - 1, c->f);
  buf[n] = 0;
  fclose(c->f);
  return buf;
}

#endif
