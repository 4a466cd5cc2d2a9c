/* indexed.h — Megatron's mmap indexed dataset: PREFIX.bin + PREFIX.idx.
 *
 * .idx, little-endian, unaligned: 9-byte magic "MMIDIDX\0\0"; u64 version 1;
 * u8 dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16);
 * u64 sequence count N; u64 document-index length D+1; int32[N] sequence
 * lengths in tokens; int64[N] byte offsets into .bin; int64[D+1] document
 * boundaries over sequence indices (0 first, non-decreasing, at most N; N
 * last as preprocess_data.py writes it, but merged indices from Megatron's
 * old merge_file_ keep only [0], and training never reads it: the GPT
 * dataset splits sequences, as Megatron does). .bin: the raw tokens.
 * Users bring files built by Megatron-LM's preprocess_data.py: they are read
 * as they are. Every field is checked on open; a malformed file is refused
 * naming the file, the field and the index where it went wrong.
 * It never writes the files, and never reads a field it has not checked.
 */
#ifndef MT_INDEXED_H
#define MT_INDEXED_H

#include <stddef.h>
#include <stdint.h>

enum {
  MT_IDX_U8 = 1,
  MT_IDX_I8 = 2,
  MT_IDX_I16 = 3,
  MT_IDX_I32 = 4,
  MT_IDX_I64 = 5,
  MT_IDX_F64 = 6,
  MT_IDX_F32 = 7,
  MT_IDX_U16 = 8
};

typedef struct mt_indexed {
  char prefix[1024];
  int dtype; /* MT_IDX_* */
  size_t elem_bytes;
  uint64_t n_seqs;      /* N */
  uint64_t n_docs;      /* D */
  const int32_t *sizes; /* N (may be unaligned in the map: read via memcpy helpers) */
  const uint8_t *idx_map, *bin_map;
  size_t idx_bytes, bin_bytes;
  size_t sizes_off, pointers_off, doc_idx_off; /* byte offsets of the arrays in idx_map */
  uint64_t n_tokens;                           /* Σ sizes */
} mt_indexed;

int mt_indexed_open(mt_indexed *d, const char *prefix);
void mt_indexed_close(mt_indexed *d);

uint32_t mt_indexed_seq_len(const mt_indexed *d, uint64_t seq);
uint64_t mt_indexed_seq_offset(const mt_indexed *d, uint64_t seq); /* bytes into .bin */
uint64_t mt_indexed_doc_start(const mt_indexed *d, uint64_t doc);  /* first sequence; doc <= D */
/* Copies tokens [offset, offset+len) of sequence seq as int32 (any integer dtype). */
int mt_indexed_read(const mt_indexed *d, uint64_t seq, uint64_t offset, uint64_t len, int32_t *out);

/* Writer: one sequence per document unless the caller splits (Megatron's
 * sentence split); durable on finish (temp files, fsync, rename, fsync dir). */
typedef struct mt_indexed_writer mt_indexed_writer;
int mt_indexed_writer_open(mt_indexed_writer **w, const char *prefix, int dtype);
int mt_indexed_writer_add_seq(mt_indexed_writer *w, const int32_t *ids, size_t n);
int mt_indexed_writer_end_doc(mt_indexed_writer *w);
int mt_indexed_writer_finish(mt_indexed_writer *w); /* frees w */
void mt_indexed_writer_abort(mt_indexed_writer *w); /* removes temp files, frees w */

#endif
