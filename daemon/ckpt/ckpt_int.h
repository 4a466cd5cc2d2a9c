/* ckpt_int.h — what the checkpoint files share inside daemon/ckpt: names,
 * the shard header codec, the job directory scan, I/O loops. Not installed. */
#ifndef MT_CKPT_INT_H
#define MT_CKPT_INT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "ckpt.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shard arrays are little-endian fp32 written from host memory: little-endian hosts only"
#endif

#define MT__CKPT_HEADER_BYTES 64
#define MT__CKPT_MANIFEST "manifest.json"
#define MT__CKPT_LATEST "latest"

/* A shard header, decoded. */
typedef struct mt__ckpt_header {
  uint32_t version, header_bytes, tp, pp, n_arrays;
  uint64_t n;
} mt__ckpt_header;

/* "shard_tp%02d_pp%03d.bin" */
void mt__ckpt_shard_name(char out[32], int tp, int pp);
/* "step_%08lld" */
void mt__ckpt_step_name(char out[32], int64_t step);
/* Parses a step directory name: exactly what mt__ckpt_step_name makes; 0 or -1. */
int mt__ckpt_parse_step(const char *name, int64_t *step);
/* "0123456789abcdef" (16 lower-case hex digits, as manifests write them); 0 or -1. */
int mt__ckpt_parse_hex64(const char *s, uint64_t *v);
/* The manifest's seal: XXH3-64 of its compact, key-sorted JSON without the
 * "manifest_xxh3" key (what the writer adds and the reader checks). 0 when
 * out of memory sets *ok 0. */
#define MT__CKPT_SEAL_KEY "manifest_xxh3"
uint64_t mt__ckpt_seal(const json_t *manifest, int *ok);
/* Header + arrays; 0 when it would not fit in an off_t. */
uint64_t mt__ckpt_file_bytes(uint64_t n, int n_arrays);
/* Checks ranges and names; errors say "ckpt: <what>: ...". */
int mt__ckpt_check_desc(const mt_ckpt_shard_desc *d);
int mt__ckpt_check_array_name(const char *s);

void mt__ckpt_header_encode(uint8_t h[MT__CKPT_HEADER_BYTES], int tp, int pp, uint64_t n,
                            int n_arrays);
/* Checks magic and checksum; on failure returns a reason (static string). */
const char *mt__ckpt_header_decode(const uint8_t h[MT__CKPT_HEADER_BYTES], mt__ckpt_header *out);

/* latest's target step: 0; MT_ENOENT when there is no `latest`; MT_ECORRUPT
 * when it does not hold one "step_<digits>\n" line (message says why). */
int mt__ckpt_read_latest(const char *job_dir, int64_t *step);
/* Points latest at step_<step> durably (temp, fsync, rename, fsync the job
 * directory): the commit's last write, and a resume's after a fallback. */
int mt__ckpt_write_latest(const char *job_dir, int64_t step);
/* 1 when <step_dir>/manifest.json is a regular file, 0 when it is not or
 * is missing, -1 when looking failed (an I/O error): true as a test, so a
 * directory that could not be looked at is never removed as a leftover, and
 * reading it fails as unreadable. */
int mt__ckpt_committed(const char *step_dir);

/* The step directories of job_dir, ascending. *steps owned (free()). A job_dir
 * that does not exist gives none. */
typedef struct mt__ckpt_dirent {
  int64_t step;
  int committed;
} mt__ckpt_dirent;
int mt__ckpt_scan(const char *job_dir, mt__ckpt_dirent **out, size_t *n);

/* pread/pwrite until done, retrying EINTR; errno kept on failure (-1). A short
 * read at end of file returns the count read. */
int64_t mt__pread_full(int fd, void *buf, size_t n, uint64_t off);
int mt__pwrite_full(int fd, const void *buf, size_t n, uint64_t off);

/* Removes the files in step_dir and the directory, manifest first so that a
 * crash in between never leaves a committed checkpoint with missing files. */
int mt__ckpt_remove_step(const char *step_dir);

#endif
