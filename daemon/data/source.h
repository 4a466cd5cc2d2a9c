/* source.h — where the trainer's samples come from: a flat token file
 * (read in order, no splits) or a blend of Megatron indexed datasets with
 * train/valid splits. Sample i of a split is a pure function of the job and
 * i, so the engine's data position is one global sample counter. It must
 * never keep a random state of its own: that would differ between ranks,
 * layouts and a resumed run.
 */
#ifndef MT_SOURCE_H
#define MT_SOURCE_H

#include <stdint.h>

#include "gpt_dataset.h"
#include "job.h"

typedef struct mt_data_source mt_data_source;

/* Sized for n_train training samples, n_valid validation samples (0: no
 * validation) and n_test test samples (0: none). A split smaller than its
 * count is read in epochs, as the training split is. The test split is
 * opened only where every dataset of the blend has tokens in it (the
 * default "949,50,1" gives a small dataset none): mt_data_source_has_test
 * says whether it was. Token ids must be below vocab. */
int mt_data_source_open(mt_data_source **out, const mt_data_spec *spec, int seq, int vocab,
                        uint64_t seed, uint64_t n_train, uint64_t n_valid, uint64_t n_test);
int mt_data_source_has_test(const mt_data_source *s);
void mt_data_source_free(mt_data_source *s);

/* Samples first .. first+count-1 of a split as (count, seq) inputs and targets. */
int mt_data_source_read(mt_data_source *s, mt_split which, uint64_t first, int count,
                        int32_t *inputs, int32_t *targets);

/* Datasets in the blend (1 for a token file), their names, and how many of
 * the first n training samples each supplied. */
int mt_data_source_count(const mt_data_source *s);
const char *mt_data_source_name(const mt_data_source *s, int k);
uint64_t mt_data_source_consumed(const mt_data_source *s, int k, uint64_t n);
/* One line for logs: "books 70.0%, wiki 30.0% of 12800 samples". */
void mt_data_source_describe(const mt_data_source *s, uint64_t n, char *buf, size_t cap);

#endif
