/* test_pipe_schedule.c — the pipeline schedules (mt_pipe_schedule): 1F1B
 * and Megatron's interleaved 1F1B. Each stage's list must hold every
 * (chunk, micro-batch) forward once and backward once, a backward after its
 * forward; every stage must take a link's messages in the order the other
 * end sends them (the property that lets receives be posted ahead on
 * in-order links); the whole pipeline, run as stages that each wait for
 * their inputs, must finish (no deadlock); and mt_pipe_inflight must cover
 * what each chunk holds. */
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "mt_check.h"
#include "train.h"

#define MAXP 8
#define MAXOPS 4096

typedef struct {
  int n;
  mt_pipe_op ops[MAXOPS];
} stage_ops;

static stage_ops sched[MAXP];

static int make(int pp, int v, int micro, int fwd_only) {
  for (int s = 0; s < pp; s++) {
    sched[s].n = mt_pipe_schedule(pp, s, v, micro, fwd_only, sched[s].ops);
    int want = micro * v * (fwd_only ? 1 : 2);
    REQUIRE(sched[s].n == want, "pp %d v %d m %d stage %d: %d operations, want %d", pp, v, micro, s,
            sched[s].n, want);
  }
  return 0;
}

/* Every (chunk, micro) once each way on every stage, a backward after its
 * forward, chunks and micro-batches in range. */
static int each_once(int pp, int v, int micro, int fwd_only) {
  static int seen[64][256][3];
  for (int s = 0; s < pp; s++) {
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < sched[s].n; i++) {
      const mt_pipe_op *o = &sched[s].ops[i];
      REQUIRE(o->chunk >= 0 && o->chunk < v && o->micro >= 0 && o->micro < micro,
              "stage %d op %d: chunk %d micro %d out of range", s, i, o->chunk, o->micro);
      REQUIRE(!seen[o->chunk][o->micro][o->kind], "stage %d: chunk %d micro %d kind %d twice", s,
              o->chunk, o->micro, o->kind);
      REQUIRE(o->kind == MT_PIPE_FWD || seen[o->chunk][o->micro][MT_PIPE_FWD],
              "stage %d: backward of chunk %d micro %d before its forward", s, o->chunk, o->micro);
      seen[o->chunk][o->micro][o->kind] = 1;
      /* within a chunk micro-batches go in order each way (the slots' reuse
       * rule: j % slots) */
      for (int k = 0; k < i; k++)
        if (sched[s].ops[k].kind == o->kind && sched[s].ops[k].chunk == o->chunk)
          REQUIRE(sched[s].ops[k].micro < o->micro,
                  "stage %d: chunk %d's micro-batches out of order", s, o->chunk);
    }
    (void)fwd_only;
  }
  return 0;
}

/* The k-th message a link carries, as its sender makes them and as its
 * receiver takes them, must be the same (chunk, micro). */
static int links_in_order(int pp, int v) {
  for (int kind = MT_PIPE_FWD; kind <= (int)MT_PIPE_BWD; kind++)
    for (int s = 0; s < pp; s++) {
      int to = kind == MT_PIPE_FWD ? (s + 1) % pp : (s + pp - 1) % pp;
      if (v == 1 && (kind == MT_PIPE_FWD ? s == pp - 1 : s == 0)) continue; /* no ring */
      int a = 0, b = 0;
      for (;;) {
        /* the sender's next op of this kind that sends on this link */
        while (a < sched[s].n) {
          const mt_pipe_op *o = &sched[s].ops[a];
          int sends =
              (int)o->kind == kind && (kind == MT_PIPE_FWD ? !(s == pp - 1 && o->chunk == v - 1)
                                                           : !(s == 0 && o->chunk == 0));
          if (sends) break;
          a++;
        }
        while (b < sched[to].n) {
          const mt_pipe_op *o = &sched[to].ops[b];
          int takes =
              (int)o->kind == kind && (kind == MT_PIPE_FWD ? !(to == 0 && o->chunk == 0)
                                                           : !(to == pp - 1 && o->chunk == v - 1));
          if (takes) break;
          b++;
        }
        if (a == sched[s].n || b == sched[to].n) {
          REQUIRE(a == sched[s].n && b == sched[to].n, "link %d -> %d (kind %d): %s sends more", s,
                  to, kind, a < sched[s].n ? "the sender" : "the receiver");
          break;
        }
        const mt_pipe_op *x = &sched[s].ops[a], *y = &sched[to].ops[b];
        /* across the ring's wrap the chunk moves by one */
        int dc = kind == MT_PIPE_FWD ? (to == 0 ? 1 : 0) : (s == 0 ? -1 : 0);
        REQUIRE(y->chunk == x->chunk + dc && y->micro == x->micro,
                "link %d -> %d (kind %d): sent chunk %d micro %d, taken as chunk %d micro %d", s,
                to, kind, x->chunk, x->micro, y->chunk, y->micro);
        a++, b++;
      }
    }
  return 0;
}

/* Runs every stage until each op's input exists (what a blocking receive
 * waits for; sends never block): all must finish. */
static int finishes(int pp, int v, int micro) {
  static unsigned char done[MAXP][64][256][3];
  memset(done, 0, sizeof done);
  int at[MAXP] = {0}, left = 0;
  for (int s = 0; s < pp; s++) left += sched[s].n;
  while (left > 0) {
    int moved = 0;
    for (int s = 0; s < pp; s++) {
      while (at[s] < sched[s].n) {
        const mt_pipe_op *o = &sched[s].ops[at[s]];
        int c = o->chunk, j = o->micro, ready;
        if (o->kind == MT_PIPE_FWD)
          ready = s == 0 && c == 0 ? 1 : s > 0 ? done[s - 1][c][j][1] : done[pp - 1][c - 1][j][1];
        else if (s == pp - 1 && c == v - 1)
          ready = done[s][c][j][1];
        else
          ready = s < pp - 1 ? done[s + 1][c][j][2] : done[0][c + 1][j][2];
        if (!ready) break;
        done[s][c][j][o->kind] = 1;
        at[s]++, left--, moved = 1;
      }
    }
    REQUIRE(moved, "pp %d v %d m %d: deadlock with %d operations left (stage 0 at %d)", pp, v,
            micro, left, at[0]);
  }
  return 0;
}

/* run_pipeline's waits, stage by stage, with sends that complete only once
 * their receiver has posted the matching receive (NCCL's rule; a link
 * matches its k-th send with its k-th receive): the receive of an
 * operation posted one ahead (overlap) or after the compute (blocking),
 * the input gradient's send waited before the next backward, a chunk's
 * output sends before its slot is written again (forward) or recomputed
 * (backward), at most 7 output sends pending, and every send at the end;
 * blocking with one chunk also waits for each send at once. All stages
 * must finish. */
enum { ACT_CAP = 8 };
typedef struct {
  int i, phase;              /* operation, and where in it */
  int act_q[MAXOPS][3], n_q; /* pending output sends: link index, chunk, micro */
  int grad_send;             /* link index of the pending gradient send, -1: none */
} sim_stage;

static int sent[2][MAXP], posted[2][MAXP]; /* per kind (0 act, 1 grad) and sending stage */

static int receives_on(int pp, int v, int s, const mt_pipe_op *o) {
  return o->kind == MT_PIPE_FWD ? !(s == 0 && o->chunk == 0) : !(s == pp - 1 && o->chunk == v - 1);
}
/* the sending stage of the link o's input comes on */
static int from_stage(int pp, int s, const mt_pipe_op *o) {
  return o->kind == MT_PIPE_FWD ? (s + pp - 1) % pp : (s + 1) % pp;
}

static int run_waits(int pp, int v, int micro, int overlap) {
  static sim_stage st[MAXP];
  static int recv_at[MAXP][MAXOPS]; /* the link index of op i's receive, when posted */
  int slots[MAXP][64];
  memset(sent, 0, sizeof sent);
  memset(posted, 0, sizeof posted);
  for (int s = 0; s < pp; s++) {
    st[s] = (sim_stage){.grad_send = -1};
    REQUIRE(!mt_pipe_inflight(pp, s, v, micro, slots[s]), "%s", mt_errmsg());
  }
  int done = 0;
  while (done < pp) {
    int moved = 0;
    for (int s = 0; s < pp; s++) {
      sim_stage *x = &st[s];
      for (;;) {
        if (x->i == sched[s].n) { /* the end: every send */
          if (x->phase == -1) break;
          if (x->n_q && posted[0][s] <= x->act_q[0][0]) break;
          if (x->n_q) {
            memmove(x->act_q, x->act_q + 1, (size_t)--x->n_q * sizeof x->act_q[0]);
            continue;
          }
          if (x->grad_send >= 0 && posted[1][s] <= x->grad_send) break;
          x->grad_send = -1, x->phase = -1, done++, moved = 1;
          break;
        }
        const mt_pipe_op *o = &sched[s].ops[x->i];
        const mt_pipe_op *next = x->i + 1 < sched[s].n ? &sched[s].ops[x->i + 1] : NULL;
        int kind = o->kind == MT_PIPE_FWD ? 0 : 1;
        if (x->phase == 0) { /* posting (the first op's, or the next one's) and waiting */
          if (x->i == 0 && receives_on(pp, v, s, o))
            recv_at[s][0] = posted[kind][from_stage(pp, s, o)]++;
          x->phase = 1;
        }
        if (x->phase == 1) { /* this op's receive */
          if (receives_on(pp, v, s, o) && sent[kind][from_stage(pp, s, o)] <= recv_at[s][x->i])
            break;
          if (overlap && next && receives_on(pp, v, s, next)) {
            int nk = next->kind == MT_PIPE_FWD ? 0 : 1;
            recv_at[s][x->i + 1] = posted[nk][from_stage(pp, s, next)]++;
          }
          x->phase = 2;
        }
        if (x->phase == 2) { /* before the compute: the sends whose buffers it writes */
          if (o->kind == MT_PIPE_BWD && x->grad_send >= 0) {
            if (posted[1][s] <= x->grad_send) break;
            x->grad_send = -1;
          }
          int upto = o->kind == MT_PIPE_FWD ? o->micro - slots[s][o->chunk] : o->micro, last = -1;
          for (int q = 0; q < x->n_q; q++)
            if (x->act_q[q][1] == o->chunk && x->act_q[q][2] <= upto) last = q;
          if (last >= 0) {
            if (posted[0][s] <= x->act_q[0][0]) break;
            memmove(x->act_q, x->act_q + 1, (size_t)--x->n_q * sizeof x->act_q[0]);
            continue;
          }
          x->phase = 3;
        }
        if (x->phase == 3) { /* the send of what it made */
          int sends = o->kind == MT_PIPE_FWD ? !(s == pp - 1 && o->chunk == v - 1)
                                             : !(s == 0 && o->chunk == 0);
          if (sends && o->kind == MT_PIPE_FWD && x->n_q > ACT_CAP - 1) {
            if (posted[0][s] <= x->act_q[0][0]) break;
            memmove(x->act_q, x->act_q + 1, (size_t)--x->n_q * sizeof x->act_q[0]);
            continue;
          }
          if (sends && o->kind == MT_PIPE_FWD) {
            x->act_q[x->n_q][0] = sent[0][s]++;
            x->act_q[x->n_q][1] = o->chunk, x->act_q[x->n_q++][2] = o->micro;
          } else if (sends) {
            x->grad_send = sent[1][s]++;
          }
          x->phase = 4;
          if (!overlap && next && receives_on(pp, v, s, next)) {
            int nk = next->kind == MT_PIPE_FWD ? 0 : 1;
            recv_at[s][x->i + 1] = posted[nk][from_stage(pp, s, next)]++;
          }
        }
        if (x->phase == 4 && !overlap && v == 1) { /* blocking, one chunk: the send at once */
          if (kind == 0 && x->n_q) {
            if (posted[0][s] <= x->act_q[0][0]) break;
            memmove(x->act_q, x->act_q + 1, (size_t)--x->n_q * sizeof x->act_q[0]);
            continue;
          }
          if (kind == 1 && x->grad_send >= 0) {
            if (posted[1][s] <= x->grad_send) break;
            x->grad_send = -1;
          }
        }
        x->i++, x->phase = 1, moved = 1; /* blocking: the next receive is waited in phase 1 */
      }
    }
    REQUIRE(moved, "pp %d v %d m %d %s: deadlock (stages at %d, %d)", pp, v, micro,
            overlap ? "overlapped" : "blocking", st[0].i, st[pp - 1].i);
  }
  return 0;
}

/* mt_pipe_inflight covers the activations each chunk holds. */
static int inflight_covers(int pp, int v, int micro) {
  for (int s = 0; s < pp; s++) {
    int cover[64], held[64] = {0}, most[64] = {0};
    REQUIRE(!mt_pipe_inflight(pp, s, v, micro, cover), "%s", mt_errmsg());
    for (int i = 0; i < sched[s].n; i++) {
      const mt_pipe_op *o = &sched[s].ops[i];
      held[o->chunk] += o->kind == MT_PIPE_FWD ? 1 : -1;
      if (held[o->chunk] > most[o->chunk]) most[o->chunk] = held[o->chunk];
    }
    for (int c = 0; c < v; c++)
      REQUIRE(cover[c] >= most[c] && cover[c] >= 1, "stage %d chunk %d holds %d, inflight says %d",
              s, c, most[c], cover[c]);
  }
  return 0;
}

static void test_1f1b_is_pipedream_flush(void) {
  int pp = 4, m = 6, bad = make(pp, 1, m, 0);
  for (int s = 0; s < pp && !bad; s++) {
    /* p - s - 1 forwards, then forward and backward in turn, then backwards */
    int warm = pp - s - 1, f = 0, b = 0;
    for (int i = 0; i < sched[s].n; i++) {
      int want_fwd = f < m && (f < warm || f - warm == b);
      const mt_pipe_op *o = &sched[s].ops[i];
      CHECK(o->chunk == 0 && o->kind == (want_fwd ? MT_PIPE_FWD : MT_PIPE_BWD) &&
                o->micro == (want_fwd ? f : b),
            "stage %d op %d: kind %d micro %d", s, i, o->kind, o->micro);
      if (want_fwd)
        f++;
      else
        b++;
    }
  }
  CHECK(!bad, "schedule");
  int inflight[1];
  for (int s = 0; s < pp; s++) {
    CHECK(!mt_pipe_inflight(pp, s, 1, m, inflight) && inflight[0] == pp - s,
          "stage %d: 1F1B holds pp - s = %d, inflight says %d", s, pp - s, inflight[0]);
  }
  CHECK(!mt_pipe_inflight(4, 0, 1, 2, inflight) && inflight[0] == 2,
        "two micro-batches: at most two held, inflight says %d", inflight[0]);
  printf("  ok test_1f1b_is_pipedream_flush\n");
}

static void test_interleaved_warmup_is_megatrons(void) {
  int pp = 4, v = 2, m = 8;
  CHECK(!make(pp, v, m, 0), "schedule");
  for (int s = 0; s < pp; s++) {
    /* the warm-up, then the steady state's first forward */
    int lead = 0, warm = 2 * (pp - s - 1) + (v - 1) * pp;
    while (lead < sched[s].n && sched[s].ops[lead].kind == MT_PIPE_FWD) lead++;
    CHECK(lead == warm + 1, "stage %d: %d forwards lead, Megatron's %d warm-up ones and one", s,
          lead, warm);
  }
  /* forwards: pp micro-batches of chunk 0, then of chunk 1, ...; backwards
   * the chunks in reverse */
  const mt_pipe_op *o = sched[1].ops;
  CHECK(o[0].chunk == 0 && o[0].micro == 0 && o[3].chunk == 0 && o[3].micro == 3 &&
            o[4].chunk == 1 && o[4].micro == 0,
        "stage 1's forwards do not go pp at a time per chunk");
  for (int i = 0, k = 0; i < sched[1].n; i++) {
    if (sched[1].ops[i].kind != MT_PIPE_BWD) continue;
    if (k++ == 0)
      CHECK(sched[1].ops[i].chunk == v - 1, "the first backward is not the last chunk's");
  }
  /* pp micro-batches: every forward first, as Megatron does */
  CHECK(!make(pp, v, pp, 0), "schedule");
  for (int s = 0; s < pp; s++)
    CHECK(sched[s].ops[pp * v - 1].kind == MT_PIPE_FWD && sched[s].ops[pp * v].kind == MT_PIPE_BWD,
          "stage %d: with m = pp not every forward comes first", s);
  printf("  ok test_interleaved_warmup_is_megatrons\n");
}

static void test_schedules_are_whole_ordered_and_finish(void) {
  int n = 0;
  for (int pp = 2; pp <= 6; pp++)
    for (int v = 1; v <= 4; v++)
      for (int m = pp; m <= 5 * pp; m += v > 1 ? pp : 1) {
        for (int fwd_only = 0; fwd_only <= 1; fwd_only++) {
          int bad = make(pp, v, m, fwd_only) || each_once(pp, v, m, fwd_only) ||
                    links_in_order(pp, v) || finishes(pp, v, m);
          if (!bad && !fwd_only) bad = run_waits(pp, v, m, 1) || run_waits(pp, v, m, 0);
          if (!bad && !fwd_only) bad = inflight_covers(pp, v, m);
          CHECK(!bad, "pp %d v %d m %d%s", pp, v, m, fwd_only ? " forward only" : "");
          if (bad) return;
          n++;
        }
      }
  /* and 1F1B with fewer micro-batches than stages */
  for (int m = 1; m < 4; m++)
    CHECK(!make(4, 1, m, 0) && !each_once(4, 1, m, 0) && !links_in_order(4, 1) &&
              !finishes(4, 1, m),
          "pp 4 m %d", m);
  printf("  ok test_schedules_are_whole_ordered_and_finish (%d schedules)\n", n);
}

int main(void) {
  test_1f1b_is_pipedream_flush();
  test_interleaved_warmup_is_megatrons();
  test_schedules_are_whole_ordered_and_finish();
  printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
