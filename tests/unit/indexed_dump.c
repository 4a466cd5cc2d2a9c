/* indexed_dump.c — prints what libmtnlg reads from an indexed dataset as JSON,
 * for test_indexed_python.py to compare with what its own writer wrote.
 *
 *   indexed_dump PREFIX
 *   {"dtype": 8, "n_seqs": N, "n_docs": D, "n_tokens": T, "doc_idx": [D+1],
 *    "sizes": [N], "pointers": [N], "seqs": [[tokens of each sequence], ...]}
 *
 * A refused file: the error on stderr as "CODE: message", exit status 1. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "err.h"
#include "indexed.h"

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: indexed_dump PREFIX\n");
    return 2;
  }
  mt_indexed d;
  int rc = mt_indexed_open(&d, argv[1]);
  if (rc) {
    fprintf(stderr, "%s: %s\n", mt_strerror(rc), mt_errmsg());
    return 1;
  }
  int ret = 1;
  int32_t *ids = NULL;
  printf("{\"dtype\": %d, \"n_seqs\": %" PRIu64 ", \"n_docs\": %" PRIu64 ", \"n_tokens\": %" PRIu64,
         d.dtype, d.n_seqs, d.n_docs, d.n_tokens);
  printf(",\n \"doc_idx\": [");
  for (uint64_t i = 0; i <= d.n_docs; i++)
    printf("%s%" PRIu64, i ? ", " : "", mt_indexed_doc_start(&d, i));
  printf("],\n \"sizes\": [");
  for (uint64_t i = 0; i < d.n_seqs; i++)
    printf("%s%" PRIu32, i ? ", " : "", mt_indexed_seq_len(&d, i));
  printf("],\n \"pointers\": [");
  for (uint64_t i = 0; i < d.n_seqs; i++)
    printf("%s%" PRIu64, i ? ", " : "", mt_indexed_seq_offset(&d, i));
  printf("],\n \"seqs\": [");
  for (uint64_t i = 0; i < d.n_seqs; i++) {
    uint32_t n = mt_indexed_seq_len(&d, i);
    int32_t *grown = realloc(ids, (n ? n : 1) * sizeof *ids);
    if (!grown) {
      fprintf(stderr, "out of memory\n");
      goto done;
    }
    ids = grown;
    if ((rc = mt_indexed_read(&d, i, 0, n, ids))) {
      fflush(stdout);
      fprintf(stderr, "%s: %s\n", mt_strerror(rc), mt_errmsg());
      goto done;
    }
    printf("%s[", i ? ",\n  " : "");
    for (uint32_t j = 0; j < n; j++) printf("%s%" PRId32, j ? ", " : "", ids[j]);
    printf("]");
  }
  printf("]}\n");
  ret = 0;
done:
  free(ids);
  mt_indexed_close(&d);
  return ret;
}
