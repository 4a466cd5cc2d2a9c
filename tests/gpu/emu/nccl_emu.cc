/* nccl_emu.cc — see nccl_emu.h. Every piece of state here lives under
 * mt_emu::async_mutex(), the lock of the streams it queues on; data moves
 * under it too, on whichever thread completes an operation. */
#include "nccl_emu.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "half.h"

#define NCCL_DIE(...)                                                                              \
  do {                                                                                             \
    fprintf(stderr, "nccl_emu: " __VA_ARGS__);                                                     \
    fprintf(stderr, "\n");                                                                         \
    abort();                                                                                       \
  } while (0)

namespace nccl_emu {

enum kind { ALLREDUCE, REDUCE_SCATTER, ALLGATHER, BROADCAST, REDUCE, SEND, RECV };
const char *const kind_names[] = {"ncclAllReduce", "ncclReduceScatter", "ncclAllGather",
                                  "ncclBroadcast", "ncclReduce",        "ncclSend",
                                  "ncclRecv"};
const char *const type_names[] = {"int8",   "uint8",   "int32",   "uint32",  "int64",
                                  "uint64", "float16", "float32", "float64", "bfloat16"};
const size_t type_bytes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2};
const char *const op_names[] = {"sum", "prod", "max", "min", "avg"};

static bool reduces(kind k) { return k == ALLREDUCE || k == REDUCE_SCATTER || k == REDUCE; }
static bool rooted(kind k) { return k == BROADCAST || k == REDUCE; }

struct op_item;
struct clique;

/* One call of one rank: a collective, a send or a receive. */
struct part {
  kind k;
  const void *send;
  void *recv;
  size_t count;
  ncclDataType_t type;
  ncclRedOp_t op;
  int root, peer;
  uint64_t seq; /* collectives: the rank's n-th; sends and receives: n-th to/from the peer */
  bool active;  /* it heads its stream: peers can match it */
  bool done;
  op_item *item;
  /* the guard (activate_guard): the send data taken when it became active,
   * where the operation overwrites it (then send points here), or else a
   * copy to find a change by when the data moves */
  std::vector<char> saved, snap;
};

} // namespace nccl_emu

using namespace nccl_emu;

/* One rank's handle. */
struct ncclComm {
  clique *cl;
  int rank, device, blocking;
  uint64_t colls = 0;
  std::vector<uint64_t> sent, received; /* per peer */
  std::set<op_item *> items;            /* queued, not complete */
  bool finalizing = false;
  bool dropping = false; /* being aborted: its items no longer start */
  int enqueue_polls = 0; /* GetAsyncError answers ncclInProgress this many times more */
  bool awaiting = false; /* a call answered ncclInProgress; GetAsyncError has not said done */
  std::string last_error;
};

namespace nccl_emu {

/* The ranks of one unique id. */
struct clique {
  std::string id;
  int nranks;
  std::vector<ncclComm *> members; /* by rank: NULL before joining and after leaving */
  std::vector<bool> ever;          /* joined at some time */
  int joined = 0, live = 0;
  int aborted_by = -1; /* the first rank that aborted; -2: all had before this handle joined */
  std::map<uint64_t, std::vector<part *>> colls; /* collective n: each rank's part, once active */
  std::map<std::pair<int, int>, std::deque<part *>> sends, recvs; /* (src, dst): active, in order */
  /* late mode: collectives below this seq, and messages (src, dst) below
   * theirs, are demanded on some rank, so the peers' parts are too */
  uint64_t colls_demanded = 0;
  std::map<std::pair<int, int>, uint64_t> p2p_demanded;
};

/* What one rank queues on one stream in one call (or one group). */
struct op_item : mt_emu::async_item {
  ncclComm *comm;
  std::vector<part> parts;
  size_t left = 0;
  bool starting = false, finished = false;
  void start() override;
  void on_demand() override;
};

struct posted {
  ncclComm *c;
  cudaStream_t s;
  part p;
};

std::map<std::string, clique *> by_id; /* cliques some rank of which has yet to join */
std::set<std::string> abandoned;       /* ids whose ranks all aborted before the last joined */
std::set<ncclComm *> comms;            /* live handles */
std::atomic<unsigned long long> ids_made;

thread_local int group_depth;
thread_local std::vector<posted> group;
thread_local ncclResult_t group_error = ncclSuccess;
thread_local std::string thread_error;

/* Late mode (mt_emu_nccl_late, MT_NCCL_EMU_LATE=1): -1 until read. */
std::atomic<int> late_mode{-1};

bool late() {
  int m = late_mode.load();
  if (m < 0) {
    const char *v = getenv("MT_NCCL_EMU_LATE");
    m = v && *v && strcmp(v, "0") != 0;
    late_mode = m;
  }
  return m == 1;
}

ncclResult_t fail(ncclComm *c, ncclResult_t r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
ncclResult_t fail(ncclComm *c, ncclResult_t r, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (c) c->last_error = buf;
  thread_error = buf;
  return r;
}

ncclComm *live(ncclComm_t comm, const char *what) {
  if (!comm || !comms.count(comm))
    NCCL_DIE("%s: %p is not a live communicator (destroyed or aborted?)", what, (void *)comm);
  return comm;
}

std::string remote_error(const clique *cl) {
  if (cl->aborted_by == -2)
    return "the other ranks of this unique id aborted before this rank joined";
  return "rank " + std::to_string(cl->aborted_by) + " of " + std::to_string(cl->nranks) +
         " aborted the communicator (emulated remote error)";
}

/* ---- reductions --------------------------------------------------------- */

template <class T> struct plain {
  typedef T V;
  static V load(const void *p, size_t i) {
    T v;
    memcpy(&v, (const char *)p + i * sizeof v, sizeof v);
    return v;
  }
  static void store(void *p, size_t i, V v) { memcpy((char *)p + i * sizeof v, &v, sizeof v); }
};

struct bf16 {
  typedef float V;
  static V load(const void *p, size_t i) {
    mt_bf16 h;
    memcpy(&h.bits, (const char *)p + 2 * i, 2);
    return mt_bf16_to_f32(h);
  }
  static void store(void *p, size_t i, V v) {
    mt_bf16 h = mt_f32_to_bf16(v);
    memcpy((char *)p + 2 * i, &h.bits, 2);
  }
};

struct f16 {
  typedef float V;
  static V load(const void *p, size_t i) {
    mt_fp16 h;
    memcpy(&h.bits, (const char *)p + 2 * i, 2);
    return mt_fp16_to_f32(h);
  }
  static void store(void *p, size_t i, V v) {
    mt_fp16 h = mt_f32_to_fp16(v);
    memcpy((char *)p + 2 * i, &h.bits, 2);
  }
};

/* Integers wrap; max and min of floats drop a NaN (fmax, as NCCL's kernels). */
template <class V> V apply(ncclRedOp_t op, V a, V b) {
  if constexpr (std::is_integral<V>::value) {
    typedef typename std::make_unsigned<V>::type U;
    switch (op) {
    case ncclProd: return (V)(U)((U)a * (U)b);
    case ncclMax: return a > b ? a : b;
    case ncclMin: return a < b ? a : b;
    default: return (V)(U)((U)a + (U)b);
    }
  } else {
    switch (op) {
    case ncclProd: return a * b;
    case ncclMax: return fmax(a, b);
    case ncclMin: return fmin(a, b);
    default: return a + b;
    }
  }
}

template <class E> void combine_as(void *acc, const void *x, size_t n, ncclRedOp_t op) {
  for (size_t i = 0; i < n; i++)
    E::store(acc, i, apply<typename E::V>(op, E::load(acc, i), E::load(x, i)));
}

template <class E> void divide_as(void *acc, size_t n, int ranks) {
  typedef typename E::V V;
  for (size_t i = 0; i < n; i++) E::store(acc, i, (V)(E::load(acc, i) / (V)ranks));
}

void combine(void *acc, const void *x, size_t n, ncclDataType_t t, ncclRedOp_t op) {
  switch (t) {
  case ncclInt8: combine_as<plain<int8_t>>(acc, x, n, op); break;
  case ncclUint8: combine_as<plain<uint8_t>>(acc, x, n, op); break;
  case ncclInt32: combine_as<plain<int32_t>>(acc, x, n, op); break;
  case ncclUint32: combine_as<plain<uint32_t>>(acc, x, n, op); break;
  case ncclInt64: combine_as<plain<int64_t>>(acc, x, n, op); break;
  case ncclUint64: combine_as<plain<uint64_t>>(acc, x, n, op); break;
  case ncclFloat16: combine_as<f16>(acc, x, n, op); break;
  case ncclFloat32: combine_as<plain<float>>(acc, x, n, op); break;
  case ncclFloat64: combine_as<plain<double>>(acc, x, n, op); break;
  case ncclBfloat16: combine_as<bf16>(acc, x, n, op); break;
  default: NCCL_DIE("datatype %d", (int)t);
  }
}

void divide(void *acc, size_t n, ncclDataType_t t, int ranks) {
  switch (t) {
  case ncclInt8: divide_as<plain<int8_t>>(acc, n, ranks); break;
  case ncclUint8: divide_as<plain<uint8_t>>(acc, n, ranks); break;
  case ncclInt32: divide_as<plain<int32_t>>(acc, n, ranks); break;
  case ncclUint32: divide_as<plain<uint32_t>>(acc, n, ranks); break;
  case ncclInt64: divide_as<plain<int64_t>>(acc, n, ranks); break;
  case ncclUint64: divide_as<plain<uint64_t>>(acc, n, ranks); break;
  case ncclFloat16: divide_as<f16>(acc, n, ranks); break;
  case ncclFloat32: divide_as<plain<float>>(acc, n, ranks); break;
  case ncclFloat64: divide_as<plain<double>>(acc, n, ranks); break;
  case ncclBfloat16: divide_as<bf16>(acc, n, ranks); break;
  default: NCCL_DIE("datatype %d", (int)t);
  }
}

/* The reduction over ranks, in rank order, of each one's send + offset. */
std::vector<char> reduce_over(const std::vector<part *> &all, size_t offset) {
  const part *a = all[0];
  size_t bytes = a->count * type_bytes[a->type];
  std::vector<char> acc(bytes);
  if (!bytes) return acc;
  memcpy(acc.data(), (const char *)a->send + offset, bytes);
  for (size_t r = 1; r < all.size(); r++)
    combine(acc.data(), (const char *)all[r]->send + offset, a->count, a->type, a->op);
  if (a->op == ncclAvg) divide(acc.data(), a->count, a->type, (int)all.size());
  return acc;
}

/* ---- the guard ------------------------------------------------------------ */

/* From the moment a part heads its stream until its data moves, a GPU's
 * NCCL kernel may read its send buffer and write its receive buffer at any
 * time; work not ordered around it that touches them races it. So a part
 * that becomes active has its receive buffer poisoned (0xFF bytes: NaN in
 * every float type), which anything reading it early sees, and a copy of
 * its send data kept; when the data moves, poison that is gone (a write)
 * or send data that changed (a write the GPU might or might not have sent)
 * stops the test, naming the operation. */
struct span {
  char *p;
  size_t n;
};

/* What p writes on its rank. */
span written(const part *p, int rank, int nranks) {
  size_t b = p->count * type_bytes[p->type];
  switch (p->k) {
  case ALLREDUCE:
  case REDUCE_SCATTER:
  case BROADCAST:
  case RECV: return {(char *)p->recv, b};
  case ALLGATHER: return {(char *)p->recv, b * (size_t)nranks};
  case REDUCE: return rank == p->root ? span{(char *)p->recv, b} : span{nullptr, 0};
  default: return {nullptr, 0};
  }
}

/* What p reads on its rank. */
span read_by(const part *p, int rank, int nranks) {
  size_t b = p->count * type_bytes[p->type];
  switch (p->k) {
  case ALLREDUCE:
  case ALLGATHER:
  case REDUCE:
  case SEND: return {(char *)p->send, b};
  case REDUCE_SCATTER: return {(char *)p->send, b * (size_t)nranks};
  case BROADCAST: return rank == p->root ? span{(char *)p->send, b} : span{nullptr, 0};
  default: return {nullptr, 0};
  }
}

void activate_guard(part *p, int rank, int nranks) {
  span w = written(p, rank, nranks), r = read_by(p, rank, nranks);
  if (r.n) {
    bool overlap = w.n && r.p < w.p + w.n && w.p < r.p + r.n;
    if (overlap) {
      p->saved.assign(r.p, r.p + r.n);
      p->send = p->saved.data();
    } else {
      p->snap.assign(r.p, r.p + r.n);
    }
  }
  if (w.n) memset(w.p, 0xFF, w.n);
}

std::string describe(const part *p, int rank, int nranks);

/* p's data is about to move: nothing may have touched its buffers since. */
void check_guard(const part *p, int rank, int nranks) {
  span w = written(p, rank, nranks);
  for (size_t i = 0; i < w.n; i++)
    if ((unsigned char)w.p[i] != 0xFF)
      NCCL_DIE("%s: byte %zu of its receive buffer %p was written while the operation was in "
               "flight, by work not ordered after it (on a GPU: a race)",
               describe(p, rank, nranks).c_str(), i, (void *)w.p);
  if (!p->snap.empty() && memcmp(p->send, p->snap.data(), p->snap.size()) != 0) {
    size_t i = 0;
    while (((const char *)p->send)[i] == p->snap[i]) i++;
    NCCL_DIE("%s: byte %zu of its send buffer %p changed while the operation was in flight, by "
             "work not ordered before it is done (on a GPU: a race; NCCL may send either value)",
             describe(p, rank, nranks).c_str(), i, p->send);
  }
}

/* ---- completing work ---------------------------------------------------- */

void finish_item(op_item *it) {
  if (it->finished) return;
  it->finished = true;
  it->comm->items.erase(it);
  mt_emu::async_complete(it);
  if (!it->starting) delete it;
}

void finish_part(part *p) {
  p->done = true;
  if (--p->item->left == 0) finish_item(p->item);
}

std::string describe(const part *p, int rank, int nranks) {
  char buf[192];
  int n = snprintf(buf, sizeof buf, "%s #%llu of rank %d of %d: %zu x %s", kind_names[p->k],
                   (unsigned long long)p->seq, rank, nranks, p->count,
                   (unsigned)p->type < ncclNumTypes ? type_names[p->type] : "?");
  if (reduces(p->k) && n < (int)sizeof buf)
    n += snprintf(buf + n, sizeof buf - n, ", %s",
                  (unsigned)p->op < ncclNumOps ? op_names[p->op] : "?");
  if (rooted(p->k) && n < (int)sizeof buf)
    n += snprintf(buf + n, sizeof buf - n, ", root %d", p->root);
  if ((p->k == SEND || p->k == RECV) && n < (int)sizeof buf)
    snprintf(buf + n, sizeof buf - n, ", %s rank %d", p->k == SEND ? "to" : "from", p->peer);
  return buf;
}

/* Every rank's part of collective seq is active: move the data for all. */
void run_collective(const clique *cl, const std::vector<part *> &all) {
  const part *a = all[0];
  const int n = cl->nranks;
  for (int r = 1; r < n; r++) {
    const part *b = all[r];
    if (b->k != a->k || b->count != a->count || b->type != a->type ||
        (reduces(a->k) && b->op != a->op) || (rooted(a->k) && b->root != a->root))
      NCCL_DIE("ranks disagree on a collective (on a GPU: a hang or garbage): %s, but %s",
               describe(a, 0, n).c_str(), describe(b, r, n).c_str());
  }
  for (int r = 0; r < n; r++) check_guard(all[r], r, n);
  const size_t bytes = a->count * type_bytes[a->type];
  if (bytes) {
    switch (a->k) {
    case ALLREDUCE: {
      std::vector<char> sum = reduce_over(all, 0);
      for (int r = 0; r < n; r++) memcpy(all[r]->recv, sum.data(), bytes);
      break;
    }
    case REDUCE: {
      std::vector<char> sum = reduce_over(all, 0);
      memcpy(all[a->root]->recv, sum.data(), bytes);
      break;
    }
    case REDUCE_SCATTER: { /* every chunk first: recv may be inside send */
      std::vector<std::vector<char>> chunk(n);
      for (int r = 0; r < n; r++) chunk[r] = reduce_over(all, (size_t)r * bytes);
      for (int r = 0; r < n; r++) memcpy(all[r]->recv, chunk[r].data(), bytes);
      break;
    }
    case ALLGATHER: {
      std::vector<char> whole((size_t)n * bytes);
      for (int r = 0; r < n; r++) memcpy(whole.data() + (size_t)r * bytes, all[r]->send, bytes);
      for (int r = 0; r < n; r++) memcpy(all[r]->recv, whole.data(), whole.size());
      break;
    }
    case BROADCAST: {
      const char *from = (const char *)all[a->root]->send;
      std::vector<char> copy(from, from + bytes);
      for (int r = 0; r < n; r++) memcpy(all[r]->recv, copy.data(), bytes);
      break;
    }
    default: NCCL_DIE("collective kind %d", (int)a->k);
    }
  }
  for (int r = 0; r < n; r++) finish_part(all[r]);
}

bool demanded(const part *p) { return p->item->demanded; }

/* Pairs the active sends from src to dst with the active receives, in order
 * (in late mode while one of the pair is demanded); whether any moved. */
bool match(clique *cl, int src, int dst) {
  auto key = std::make_pair(src, dst);
  std::deque<part *> &sq = cl->sends[key], &rq = cl->recvs[key];
  bool moved = false;
  while (!sq.empty() && !rq.empty()) {
    part *s = sq.front(), *r = rq.front();
    if (late() && !demanded(s) && !demanded(r)) break;
    moved = true;
    sq.pop_front();
    rq.pop_front();
    if (s->type != r->type || s->count != r->count)
      NCCL_DIE("message %llu from rank %d to rank %d: sent as %zu x %s, received as %zu x %s "
               "(NCCL needs the same count and type)",
               (unsigned long long)s->seq, src, dst, s->count, type_names[s->type], r->count,
               type_names[r->type]);
    check_guard(s, src, cl->nranks);
    check_guard(r, dst, cl->nranks);
    size_t bytes = s->count * type_bytes[s->type];
    if (bytes) memmove(r->recv, s->send, bytes);
    finish_part(s);
    finish_part(r);
  }
  /* the queues stay, empty: finishing a part can start the stream's next
   * item, whose activation matches on this same pair while this loop holds
   * references to them */
  return moved;
}

/* Collective seq has every rank's part: its data may move (in late mode
 * once one of them is demanded). */
bool runnable(const std::vector<part *> &slot) {
  bool any = !late();
  for (const part *q : slot) {
    if (!q) return false;
    any = any || demanded(q);
  }
  return any;
}

void activate(clique *cl, int rank, part *p) {
  p->active = true;
  activate_guard(p, rank, cl->nranks);
  if (p->k == SEND) {
    cl->sends[{rank, p->peer}].push_back(p);
    match(cl, rank, p->peer);
    return;
  }
  if (p->k == RECV) {
    cl->recvs[{p->peer, rank}].push_back(p);
    match(cl, p->peer, rank);
    return;
  }
  std::vector<part *> &slot = cl->colls[p->seq];
  if (slot.empty()) slot.assign(cl->nranks, nullptr);
  slot[rank] = p;
  if (!runnable(slot)) return;
  std::vector<part *> all = slot;
  cl->colls.erase(p->seq);
  run_collective(cl, all);
}

} // namespace nccl_emu

void nccl_emu::op_item::start() {
  if (comm->dropping) return;
  starting = true;
  for (part &p : parts) activate(comm->cl, comm->rank, &p);
  starting = false;
  if (finished) delete this;
}

namespace nccl_emu {

bool collective(kind k) { return k != SEND && k != RECV; }

/* Whether x, an operation of rank `of`, is or comes before the counterpart
 * of p, rank `me`'s: a collective of its seq or earlier, or the other end of
 * a message between them. */
bool needed_for(const part &x, const part &p, int me) {
  if (collective(p.k)) return collective(x.k) && x.seq <= p.seq;
  if (x.peer != me || x.seq > p.seq) return false;
  return p.k == SEND ? x.k == RECV : x.k == SEND;
}

} // namespace nccl_emu

/* A host waits for this: its peers' matching parts are needed, and with
 * them whatever their streams hold before those. Marks the clique, too,
 * for parts the peers have yet to post (launch). */
void nccl_emu::op_item::on_demand() {
  clique *cl = comm->cl;
  const int me = comm->rank;
  for (const part &p : parts) {
    if (collective(p.k)) {
      cl->colls_demanded = std::max(cl->colls_demanded, p.seq + 1);
    } else {
      auto key = p.k == SEND ? std::make_pair(me, p.peer) : std::make_pair(p.peer, me);
      uint64_t &upto = cl->p2p_demanded[key];
      upto = std::max(upto, p.seq + 1);
    }
    for (int r = 0; r < cl->nranks; r++) {
      ncclComm *o = cl->members[r];
      if (!o || r == me || (!collective(p.k) && r != p.peer)) continue;
      for (op_item *q : o->items)
        for (const part &x : q->parts)
          if (needed_for(x, p, me)) {
            mt_emu::mark_demanded(q->stream, q->seq + 1);
            break;
          }
    }
  }
}

namespace nccl_emu {

/* Late mode: moves the data of every operation that has all its parts and
 * a demanded one, until none is left (the runtime calls this after marking
 * a demand). */
void run_demanded() {
  if (!late()) return;
  for (bool moved = true; moved;) {
    moved = false;
    std::set<clique *> cls;
    for (ncclComm *c : comms) cls.insert(c->cl);
    for (clique *cl : cls) {
      for (auto &e : cl->colls)
        if (runnable(e.second)) {
          std::vector<part *> all = e.second;
          cl->colls.erase(e.first);
          run_collective(cl, all);
          moved = true;
          break;
        }
      if (moved) break;
      std::vector<std::pair<int, int>> keys;
      for (auto &e : cl->sends) keys.push_back(e.first);
      for (auto &k : keys)
        if (cl->recvs.count(k) && match(cl, k.first, k.second)) {
          moved = true;
          break;
        }
      if (moved) break;
    }
  }
}

const int demand_runner_set = (mt_emu::set_demand_runner(run_demanded), 0);

/* Late mode: a host thread waits for c's queued work. */
void demand_all(ncclComm *c) {
  std::vector<op_item *> items(c->items.begin(), c->items.end());
  for (op_item *it : items) mt_emu::mark_demanded(it->stream, it->seq + 1);
  mt_emu::demand(nullptr, 0);
}

/* Takes every queued item of c off its stream, as if never posted. */
void drop_items(ncclComm *c) {
  clique *cl = c->cl;
  c->dropping = true;
  std::vector<op_item *> items(c->items.begin(), c->items.end());
  for (op_item *it : items)
    for (part &p : it->parts) {
      if (!p.active || p.done) continue;
      if (p.k == SEND || p.k == RECV) {
        auto key = p.k == SEND ? std::make_pair(c->rank, p.peer) : std::make_pair(p.peer, c->rank);
        std::deque<part *> &q = p.k == SEND ? cl->sends[key] : cl->recvs[key];
        for (auto i = q.begin(); i != q.end(); ++i)
          if (*i == &p) {
            q.erase(i);
            break;
          }
      } else {
        auto slot = cl->colls.find(p.seq);
        if (slot != cl->colls.end()) slot->second[c->rank] = nullptr;
      }
    }
  for (op_item *it : items) {
    c->items.erase(it);
    it->finished = true;
    mt_emu::async_complete(it);
    delete it;
  }
}

/* The handle goes; the clique with its last one. */
void leave(ncclComm *c) {
  clique *cl = c->cl;
  cl->members[c->rank] = nullptr;
  cl->live--;
  comms.erase(c);
  delete c;
  if (cl->live) return;
  auto it = by_id.find(cl->id);
  if (it != by_id.end() && it->second == cl) {
    by_id.erase(it);
    if (cl->aborted_by >= 0) abandoned.insert(cl->id);
  }
  delete cl;
}

ncclResult_t check_buffers(ncclComm *c, const part &p, const char *what) {
  const size_t n = (size_t)c->cl->nranks, b = p.count * type_bytes[p.type];
  const bool root = c->rank == p.root;
  auto need = [&](const void *ptr, size_t bytes, const char *name) {
    if (!bytes) return;
    int d = mt_emu::device_of(ptr, bytes);
    if (d < 0)
      NCCL_DIE("%s (rank %d): %s %p (%zu bytes) is host memory, not device memory", what, c->rank,
               name, ptr, bytes);
    if (d != c->device)
      NCCL_DIE("%s (rank %d): %s %p is memory of device %d; the communicator's device is %d", what,
               c->rank, name, ptr, d, c->device);
  };
  /* buffers may be the same (or, gathering and scattering, at the rank's
   * chunk) but must not otherwise overlap */
  auto apart = [&](const void *s, size_t sb, const void *r, size_t rb, const void *in_place) {
    const char *x = (const char *)s, *y = (const char *)r;
    if (!sb || !rb || x == in_place || x + sb <= y || y + rb <= x) return;
    if (p.k == REDUCE_SCATTER && y == in_place) return;
    NCCL_DIE("%s (rank %d): sendbuff %p and recvbuff %p overlap, not in place", what, c->rank, s,
             r);
  };
  switch (p.k) {
  case ALLREDUCE:
    need(p.send, b, "sendbuff"), need(p.recv, b, "recvbuff");
    apart(p.send, b, p.recv, b, p.recv);
    break;
  case REDUCE_SCATTER:
    need(p.send, b * n, "sendbuff"), need(p.recv, b, "recvbuff");
    apart(p.send, b * n, p.recv, b, (const char *)p.send + c->rank * b);
    break;
  case ALLGATHER:
    need(p.send, b, "sendbuff"), need(p.recv, b * n, "recvbuff");
    apart(p.send, b, p.recv, b * n, (const char *)p.recv + c->rank * b);
    break;
  case BROADCAST:
    if (root) need(p.send, b, "sendbuff"), apart(p.send, b, p.recv, b, p.recv);
    need(p.recv, b, "recvbuff");
    break;
  case REDUCE:
    need(p.send, b, "sendbuff");
    if (root) need(p.recv, b, "recvbuff"), apart(p.send, b, p.recv, b, p.recv);
    break;
  case SEND: need(p.send, b, "sendbuff"); break;
  case RECV: need(p.recv, b, "recvbuff"); break;
  }
  return ncclSuccess;
}

/* What NCCL checks when a call comes (with the lock held). */
ncclResult_t check_call(ncclComm *c, cudaStream_t s, const part &p, const char *what) {
  const clique *cl = c->cl;
  if ((unsigned)p.type >= ncclNumTypes)
    return fail(c, ncclInvalidArgument, "%s: datatype %d", what, (int)p.type);
  if (reduces(p.k) && (unsigned)p.op >= ncclNumOps)
    return fail(c, ncclInvalidArgument, "%s: reduction op %d", what, (int)p.op);
  if (rooted(p.k) && (p.root < 0 || p.root >= cl->nranks))
    return fail(c, ncclInvalidArgument, "%s: root %d of %d ranks", what, p.root, cl->nranks);
  if ((p.k == SEND || p.k == RECV) && (p.peer < 0 || p.peer >= cl->nranks))
    return fail(c, ncclInvalidArgument, "%s: peer %d of %d ranks", what, p.peer, cl->nranks);
  if (cl->aborted_by != -1)
    return fail(c, ncclRemoteError, "%s: %s", what, remote_error(cl).c_str());
  if (cl->joined < cl->nranks)
    return fail(c, ncclInvalidUsage, "%s: the communicator is still being initialized", what);
  if (c->awaiting)
    return fail(c, ncclInvalidUsage,
                "%s: the previous call answered ncclInProgress and ncclCommGetAsyncError has not "
                "reported ncclSuccess since",
                what);
  if (c->finalizing) return fail(c, ncclInvalidUsage, "%s: after ncclCommFinalize", what);
  if (!s) NCCL_DIE("%s: the legacy default stream is not emulated", what);
  int sd = mt_emu::stream_device(s);
  if (sd != c->device)
    return fail(c, ncclUnhandledCudaError, "%s: a stream of device %d, the communicator's is %d",
                what, sd, c->device);
  return check_buffers(c, p, what);
}

/* Queues the calls: one item per communicator and stream, in call order. */
ncclResult_t launch(std::vector<posted> &list) {
  std::vector<std::pair<op_item *, cudaStream_t>> items;
  for (posted &x : list) {
    op_item *it = nullptr;
    for (auto &e : items)
      if (e.first->comm == x.c && e.second == x.s) it = e.first;
    if (!it) {
      it = new op_item();
      it->comm = x.c;
      items.push_back({it, x.s});
    }
    part p = x.p;
    p.seq = p.k == SEND   ? x.c->sent[p.peer]++
            : p.k == RECV ? x.c->received[p.peer]++
                          : x.c->colls++;
    it->parts.push_back(p);
  }
  /* a peer's host may already wait for the other end of one of these */
  std::vector<bool> wanted(items.size(), false);
  for (size_t i = 0; i < items.size(); i++) {
    op_item *it = items[i].first;
    const clique *cl = it->comm->cl;
    for (const part &p : it->parts) {
      uint64_t upto = 0;
      if (collective(p.k)) {
        upto = cl->colls_demanded;
      } else {
        int me = it->comm->rank;
        auto key = p.k == SEND ? std::make_pair(me, p.peer) : std::make_pair(p.peer, me);
        auto d = cl->p2p_demanded.find(key);
        if (d != cl->p2p_demanded.end()) upto = d->second;
      }
      if (p.seq < upto) wanted[i] = true;
    }
  }
  bool nonblocking = false;
  for (auto &e : items) {
    op_item *it = e.first;
    ncclComm *c = it->comm;
    it->left = it->parts.size();
    for (part &p : it->parts) {
      p.item = it;
      if (!it->desc.empty()) it->desc += " + ";
      it->desc += describe(&p, c->rank, c->cl->nranks);
    }
    if (!c->blocking) {
      c->enqueue_polls = 1, c->awaiting = true;
      nonblocking = true;
    }
    c->items.insert(it);
    mt_emu::async_enqueue(e.second, it); /* may complete and free it */
    if (wanted[&e - &items[0]] && c->items.count(it)) mt_emu::demand(e.second, it->seq + 1);
  }
  return nonblocking ? ncclInProgress : ncclSuccess;
}

ncclResult_t post(ncclComm_t comm, cudaStream_t s, const part &p, const char *what) {
  std::lock_guard<std::mutex> lk(mt_emu::async_mutex());
  ncclComm *c = live(comm, what);
  ncclResult_t r = check_call(c, s, p, what);
  if (r != ncclSuccess) {
    if (group_depth && group_error == ncclSuccess) group_error = r;
    return r;
  }
  if (group_depth) {
    group.push_back({c, s, p});
    return ncclSuccess;
  }
  std::vector<posted> one{{c, s, p}};
  return launch(one);
}

part make(kind k, const void *send, void *recv, size_t count, ncclDataType_t t, ncclRedOp_t op,
          int root, int peer) {
  part p{};
  p.k = k, p.send = send, p.recv = recv, p.count = count, p.type = t, p.op = op;
  p.root = root, p.peer = peer;
  return p;
}

} // namespace nccl_emu

/* ---- the API ------------------------------------------------------------ */

const char *ncclGetErrorString(ncclResult_t r) {
  switch (r) {
  case ncclSuccess: return "no error";
  case ncclUnhandledCudaError: return "unhandled cuda error";
  case ncclSystemError: return "unhandled system error";
  case ncclInternalError: return "internal error";
  case ncclInvalidArgument: return "invalid argument";
  case ncclInvalidUsage: return "invalid usage";
  case ncclRemoteError: return "remote process exited or there was a network error";
  case ncclInProgress: return "NCCL operation in progress";
  default: return "unknown result code";
  }
}

const char *ncclGetLastError(ncclComm_t comm) {
  std::lock_guard<std::mutex> lk(mt_emu::async_mutex());
  if (comm && comms.count(comm)) return comm->last_error.c_str();
  return thread_error.c_str();
}

ncclResult_t ncclGetVersion(int *version) {
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
  memset(id, 0, sizeof *id);
  snprintf(id->internal, sizeof id->internal, "nccl-emu pid %ld id %llu", (long)getpid(),
           ++ids_made);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t *config) {
  *out = nullptr;
  if (config && (config->magic != NCCL_CONFIG_MAGIC || config->size != sizeof *config))
    return fail(nullptr, ncclInvalidArgument, "init: config not set up by NCCL_CONFIG_INITIALIZER");
  int blocking = !config || config->blocking == NCCL_CONFIG_UNDEF_INT || config->blocking != 0;
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return fail(nullptr, ncclInvalidArgument, "init: rank %d of %d", rank, nranks);
  const int dev = mt_emu::current_device();
  std::unique_lock<std::mutex> lk(mt_emu::async_mutex());
  std::string key(id.internal, sizeof id.internal);
  clique *cl = nullptr;
  auto found = by_id.find(key);
  if (found != by_id.end()) {
    cl = found->second;
    if (cl->nranks != nranks)
      return fail(nullptr, ncclInvalidArgument, "init: a unique id for %d ranks, used for %d",
                  cl->nranks, nranks);
    if (cl->ever[rank]) return fail(nullptr, ncclInvalidUsage, "init: rank %d joined twice", rank);
    for (ncclComm *m : cl->members)
      if (m && m->device == dev)
        return fail(nullptr, ncclInvalidUsage, "init: ranks %d and %d both on device %d", m->rank,
                    rank, dev);
  } else {
    cl = new clique();
    cl->id = key;
    cl->nranks = nranks;
    cl->members.assign(nranks, nullptr);
    cl->ever.assign(nranks, false);
    if (abandoned.count(key))
      cl->aborted_by = -2; /* its peers gave up: a remote error, as a failed bootstrap */
    else
      by_id[key] = cl;
  }
  ncclComm *c = new ncclComm();
  c->cl = cl;
  c->rank = rank;
  c->device = dev;
  c->blocking = blocking;
  c->sent.assign(nranks, 0);
  c->received.assign(nranks, 0);
  cl->members[rank] = c;
  cl->ever[rank] = true;
  cl->joined++;
  cl->live++;
  comms.insert(c);
  if (cl->joined == nranks) {
    auto it = by_id.find(key);
    if (it != by_id.end() && it->second == cl) by_id.erase(it);
  }
  mt_emu::async_notify();
  *out = c;
  if (!blocking) return ncclInProgress;
  mt_emu::async_wait(lk, "ncclCommInitRank",
                     [cl] { return cl->joined == cl->nranks || cl->aborted_by != -1; });
  if (cl->aborted_by != -1) return fail(c, ncclRemoteError, "init: %s", remote_error(cl).c_str());
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
  return ncclCommInitRankConfig(comm, nranks, id, rank, nullptr);
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *st) {
  std::lock_guard<std::mutex> lk(mt_emu::async_mutex());
  ncclComm *c = live(comm, "ncclCommGetAsyncError");
  clique *cl = c->cl;
  if (cl->aborted_by != -1) {
    c->last_error = remote_error(cl);
    *st = ncclRemoteError;
  } else if (cl->joined < cl->nranks || (c->finalizing && !c->items.empty())) {
    *st = ncclInProgress;
  } else if (c->enqueue_polls) {
    c->enqueue_polls--;
    *st = ncclInProgress;
  } else {
    c->awaiting = false;
    *st = ncclSuccess;
  }
  return ncclSuccess;
}

/* Non-blocking: ncclInProgress, then GetAsyncError says when the rank's
 * queued work is done. */
ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  std::unique_lock<std::mutex> lk(mt_emu::async_mutex());
  ncclComm *c = live(comm, "ncclCommFinalize");
  c->finalizing = true;
  demand_all(c); /* finishing is waiting for it */
  if (!c->blocking) return ncclInProgress;
  clique *cl = c->cl;
  mt_emu::async_wait(lk, "ncclCommFinalize",
                     [c, cl] { return c->items.empty() || cl->aborted_by != -1; });
  if (cl->aborted_by != -1)
    return fail(c, ncclRemoteError, "finalize: %s", remote_error(cl).c_str());
  return ncclSuccess;
}

/* Waits for the rank's queued work, as NCCL does, unless a peer aborted. */
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  std::unique_lock<std::mutex> lk(mt_emu::async_mutex());
  ncclComm *c = live(comm, "ncclCommDestroy");
  clique *cl = c->cl;
  if (!c->items.empty()) {
    demand_all(c);
    std::string what = "ncclCommDestroy waits for " + (*c->items.begin())->desc;
    mt_emu::async_wait(lk, what.c_str(),
                       [c, cl] { return c->items.empty() || cl->aborted_by != -1; });
  }
  if (!c->items.empty()) drop_items(c);
  leave(c);
  mt_emu::async_notify();
  return ncclSuccess;
}

static std::atomic<int> abort_waits;

void mt_emu_nccl_abort_waits(int on) { abort_waits = on; }

int mt_emu_nccl_late(int on) {
  int was = late();
  late_mode = on ? 1 : 0;
  return was;
}

static std::atomic<int> abort_calls;

int mt_emu_nccl_abort_count(void) { return abort_calls.load(); }

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  std::unique_lock<std::mutex> lk(mt_emu::async_mutex());
  ncclComm *c = live(comm, "ncclCommAbort");
  if (c->cl->aborted_by == -1) c->cl->aborted_by = c->rank;
  abort_calls++;
  drop_items(c);
  mt_emu::async_notify();
  /* as the real one's cudaFree: behind every kernel of the device */
  auto device_idle = [c] {
    for (ncclComm *o : comms)
      if (o != c && o->device == c->device && !o->dropping && !o->items.empty()) return false;
    return true;
  };
  for (ncclComm *o : comms)
    if (o != c && o->device == c->device && !o->dropping) demand_all(o);
  for (int waited_ms = 0; abort_waits && !device_idle(); waited_ms++) {
    if (waited_ms >= 5000)
      NCCL_DIE("ncclCommAbort of rank %d on device %d: another communicator of the device still "
               "has work in flight after 5 s; a GPU would wait for it forever",
               c->rank, c->device);
    lk.unlock();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    lk.lock();
    c = live(comm, "ncclCommAbort");
  }
  leave(c);
  mt_emu::async_notify();
  return ncclSuccess;
}

ncclResult_t ncclCommCount(ncclComm_t comm, int *count) {
  std::lock_guard<std::mutex> lk(mt_emu::async_mutex());
  *count = live(comm, "ncclCommCount")->cl->nranks;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(ncclComm_t comm, int *rank) {
  std::lock_guard<std::mutex> lk(mt_emu::async_mutex());
  *rank = live(comm, "ncclCommUserRank")->rank;
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t t,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t s) {
  return post(comm, s, make(ALLREDUCE, send, recv, count, t, op, -1, -1), "ncclAllReduce");
}

ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t count, ncclDataType_t t,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t s) {
  return post(comm, s, make(REDUCE_SCATTER, send, recv, count, t, op, -1, -1), "ncclReduceScatter");
}

ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, ncclDataType_t t,
                           ncclComm_t comm, cudaStream_t s) {
  return post(comm, s, make(ALLGATHER, send, recv, count, t, ncclSum, -1, -1), "ncclAllGather");
}

ncclResult_t ncclBroadcast(const void *send, void *recv, size_t count, ncclDataType_t t, int root,
                           ncclComm_t comm, cudaStream_t s) {
  return post(comm, s, make(BROADCAST, send, recv, count, t, ncclSum, root, -1), "ncclBroadcast");
}

ncclResult_t ncclReduce(const void *send, void *recv, size_t count, ncclDataType_t t,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t s) {
  return post(comm, s, make(REDUCE, send, recv, count, t, op, root, -1), "ncclReduce");
}

ncclResult_t ncclSend(const void *send, size_t count, ncclDataType_t t, int peer, ncclComm_t comm,
                      cudaStream_t s) {
  return post(comm, s, make(SEND, send, nullptr, count, t, ncclSum, -1, peer), "ncclSend");
}

ncclResult_t ncclRecv(void *recv, size_t count, ncclDataType_t t, int peer, ncclComm_t comm,
                      cudaStream_t s) {
  return post(comm, s, make(RECV, nullptr, recv, count, t, ncclSum, -1, peer), "ncclRecv");
}

ncclResult_t ncclGroupStart(void) {
  group_depth++;
  return ncclSuccess;
}

/* The group's calls queue together, so a send and a receive in it never
 * wait for each other. */
ncclResult_t ncclGroupEnd(void) {
  if (!group_depth) return fail(nullptr, ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  if (--group_depth) return ncclSuccess;
  std::vector<posted> list;
  list.swap(group);
  ncclResult_t err = group_error;
  group_error = ncclSuccess;
  if (err != ncclSuccess || list.empty()) return err;
  std::lock_guard<std::mutex> lk(mt_emu::async_mutex());
  for (posted &x : list) live(x.c, "ncclGroupEnd");
  return launch(list);
}
