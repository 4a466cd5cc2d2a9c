/* tokens.c — flat uint16 token files by mmap. */
#include "tokens.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"

int mt_tokens_open(mt_token_file *f, const char *path) {
  memset(f, 0, sizeof *f);
  snprintf(f->path, sizeof f->path, "%s", path);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return mt_seterr(MT_EIO, "data: open %s: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st)) {
    close(fd);
    return mt_seterr(MT_EIO, "data: stat %s: %s", path, strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return mt_seterr(MT_EINVAL, "data: %s is not a regular file (a file of uint16 tokens)", path);
  }
  if (st.st_size % 2) {
    close(fd);
    return mt_seterr(MT_ECORRUPT, "data: %s has %lld bytes, not a whole number of uint16 tokens",
                     path, (long long)st.st_size);
  }
  if (st.st_size < 4) {
    close(fd);
    return mt_seterr(MT_EINVAL, "data: %s holds %lld token(s); need at least 2", path,
                     (long long)st.st_size / 2);
  }
  void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return mt_seterr(MT_EIO, "data: mmap %s: %s", path, strerror(errno));
  f->map = map;
  f->map_bytes = (size_t)st.st_size;
  f->tokens = map;
  f->n_tokens = f->map_bytes / 2;
  return 0;
}

void mt_tokens_close(mt_token_file *f) {
  if (f->map) munmap(f->map, f->map_bytes);
  memset(f, 0, sizeof *f);
}

uint64_t mt_tokens_samples(const mt_token_file *f, int seq) {
  if (seq < 1 || f->n_tokens < 2) return 0;
  return (f->n_tokens - 1) / (uint64_t)seq;
}

int mt_tokens_read(const mt_token_file *f, uint64_t first, int count, int seq, int vocab,
                   int32_t *inputs, int32_t *targets) {
  uint64_t n = mt_tokens_samples(f, seq);
  if (n == 0)
    return mt_seterr(MT_EINVAL, "data: %s has %zu tokens, fewer than one sample of %d + 1", f->path,
                     f->n_tokens, seq);
  for (int i = 0; i < count; i++) {
    uint64_t k = (first + (uint64_t)i) % n;
    const uint16_t *src = f->tokens + k * (uint64_t)seq;
    for (int t = 0; t <= seq; t++) {
      /* the format is little-endian; so is every host we build for */
      int tok = src[t];
      if (tok >= vocab)
        return mt_seterr(MT_ECORRUPT, "data: %s: token %d at offset %llu is outside vocab %d",
                         f->path, tok, (unsigned long long)(k * (uint64_t)seq + (uint64_t)t),
                         vocab);
      if (t < seq) inputs[(size_t)i * seq + t] = tok;
      if (t > 0) targets[(size_t)i * seq + t - 1] = tok;
    }
  }
  return 0;
}
