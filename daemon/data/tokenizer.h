/* tokenizer.h — text to token ids: GPT-2 byte-level BPE, or raw bytes.
 *
 * GPT-2 BPE loads either vocab.json + merges.txt (Hugging Face names) or
 * encoder.json + vocab.bpe (OpenAI's names; the same content). Text is UTF-8;
 * invalid sequences are replaced by U+FFFD before tokenising (as a JavaScript
 * or Python reader with errors="replace" would see them) and counted.
 * A tokenizer is immutable after opening; encode is thread-safe, with a
 * per-call scratch (mt_tok_scratch) so threads share one tokenizer.
 * Invalid UTF-8 never fails an encode: it is replaced and counted.
 */
#ifndef MT_TOKENIZER_H
#define MT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct mt_tokenizer mt_tokenizer;

/* vocab_path: vocab.json or encoder.json; merges_path: merges.txt or vocab.bpe. */
int mt_tokenizer_open_gpt2(mt_tokenizer **out, const char *vocab_path, const char *merges_path);
/* Bytes as ids 0..255, EOD = 256, vocab 257. Needs no files. */
int mt_tokenizer_open_bytes(mt_tokenizer **out);
void mt_tokenizer_free(mt_tokenizer *t);

int mt_tokenizer_vocab_size(const mt_tokenizer *t);   /* 50257 for GPT-2 */
int32_t mt_tokenizer_eod(const mt_tokenizer *t);      /* <|endoftext|> = 50256 for GPT-2 */
const char *mt_tokenizer_name(const mt_tokenizer *t); /* "gpt2-bpe", "bytes" */

/* Growable output and scratch; zero-initialise, free with mt_tok_buf_free. */
typedef struct mt_tok_buf {
  int32_t *ids;
  size_t n, cap;
  void *scratch;         /* tokenizer-private, reused across calls */
  uint64_t invalid_utf8; /* replaced invalid sequences, accumulated */
} mt_tok_buf;
void mt_tok_buf_free(mt_tok_buf *b);

/* Appends the ids of text[0..len) to b (no EOD). 0 or MT_ENOMEM. */
int mt_tokenizer_encode(const mt_tokenizer *t, const char *text, size_t len, mt_tok_buf *b);

/* Writes the UTF-8 text of ids to a new *out (malloc'ed, NUL-terminated; len may be NULL). */
int mt_tokenizer_decode(const mt_tokenizer *t, const int32_t *ids, size_t n, char **out,
                        size_t *len);

#endif
