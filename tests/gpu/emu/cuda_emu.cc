/* cuda_emu.cc — see cuda_emu.h. */
#include "cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

/* Under AddressSanitizer every switch between fibers is announced to it, so
 * that it knows which stack runs (kernels' local arrays, a thread's
 * "registers", are checked like any other stack object). */
#ifdef MT_ASAN
#include <sanitizer/common_interface_defs.h>
#endif
/* Under ThreadSanitizer the fibers are not its fibers: a block's threads
 * run one at a time on the launching thread, so to it they are that thread,
 * as they are to the kernels' results (which the thread orders and their
 * guards check), and a switch costs nothing. (Its fibers, one per thread
 * slot, cost a synchronisation of vector clocks as wide as the fibers at
 * every switch: half of the engine's time.) The call stack it keeps for
 * the thread must still come out even: a fiber's last switch (a finished
 * thread's) never returns, so the functions on that path keep out of its
 * call stack altogether, and the frames of the fibers of a block, which
 * interleave on the one stack while they are switched out, are all gone
 * when the block ends. */
#if defined(MT_TSAN) && defined(__clang__)
#define EMU_TSAN_OFF __attribute__((disable_sanitizer_instrumentation))
#elif defined(MT_TSAN)
#define EMU_TSAN_OFF __attribute__((no_sanitize_thread, noinline))
#else
#define EMU_TSAN_OFF
#endif

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <set>
#include <vector>

#include "half.h"
#include "mtmath.h"

#define EMU_DIE(...)                                                                               \
  do {                                                                                             \
    fprintf(stderr, "cuda_emu: " __VA_ARGS__);                                                     \
    fprintf(stderr, "\n");                                                                         \
    abort();                                                                                       \
  } while (0)

/* Per host thread, as in CUDA. */
static thread_local cudaError_t last_error = cudaSuccess;
static thread_local int current_dev = 0;

static int emu_devices(void) {
  const char *s = getenv("MT_CUDA_EMU_DEVICES");
  return s ? atoi(s) : 1;
}

static size_t emu_memory_bytes(void) {
  const char *s = getenv("MT_CUDA_EMU_MEM_BYTES");
  return s ? (size_t)strtoull(s, NULL, 10) : (size_t)16 << 30;
}

/* ---- memory ------------------------------------------------------------- */

struct allocation {
  size_t bytes;   /* as asked, rounded up to 32: the end abuts the guard page */
  size_t charged; /* rounded up to 256, as a GPU's allocator counts it */
  int device;
  char *map; /* the mapping: the buffer, then the guard page */
  size_t map_bytes;
};

static std::mutex mem_mu;                           /* never held while taking async_mutex() */
static std::map<uintptr_t, allocation> allocations; /* by base */
static std::map<int, size_t> device_bytes;          /* allocated per device */

int mt_emu::device_of(const void *p, size_t bytes) {
  std::lock_guard<std::mutex> lk(mem_mu);
  uintptr_t a = (uintptr_t)p;
  auto it = allocations.upper_bound(a);
  if (it == allocations.begin()) return -1;
  --it;
  if (a >= it->first + it->second.bytes) return -1;
  if (a + bytes > it->first + it->second.bytes)
    EMU_DIE("%zu bytes at %p run past the end of a %zu-byte allocation", bytes, p,
            it->second.bytes);
  return it->second.device;
}

static int is_device(const void *p, size_t bytes) { return mt_emu::device_of(p, bytes) >= 0; }

int mt_emu::current_device() { return current_dev; }

cudaError_t cudaGetDeviceCount(int *n) {
  *n = emu_devices();
  return *n ? cudaSuccess : cudaErrorNoDevice;
}

cudaError_t cudaSetDevice(int dev) {
  if (dev < 0 || dev >= emu_devices()) return last_error = cudaErrorInvalidDevice;
  current_dev = dev;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int *dev) {
  *dev = current_dev;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr attr, int dev) {
  (void)dev;
  *v = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? mt_emu::smem_optin() : 4;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) {
  std::lock_guard<std::mutex> lk(mem_mu);
  size_t t = emu_memory_bytes(), used = device_bytes[current_dev];
  *total = t;
  *free_bytes = used < t ? t - used : 0;
  return cudaSuccess;
}

/* ---- streams, events and queued work ------------------------------------ */

/* A stream's queue holds only work that completes later (async_item); the
 * rest runs when issued, once the queue is empty. A destroyed stream lives on
 * until its queue is empty and no event refers to it. */
struct CUstream_st {
  int device;
  unsigned flags;
  std::deque<mt_emu::async_item *> q;
  uint64_t next_seq = 1;
  int event_refs = 0;
  bool destroyed = false;
};

/* An event is complete once its stream has run everything queued before the
 * record (the items with seq < ticket). Its time is when the emulator first
 * saw it complete. */
struct CUevent_st {
  unsigned flags;
  bool recorded = false;
  CUstream_st *stream = nullptr; /* while it may be pending; holds a ref */
  uint64_t ticket = 0;
  std::chrono::steady_clock::time_point at;
  bool timed = false; /* `at` is set */
};

namespace {

std::mutex amu;
std::condition_variable acv;
std::set<CUstream_st *> streams; /* destroyed ones too, until their queue empties */
std::set<CUevent_st *> events;
std::vector<mt_emu::async_item *> to_start;
bool draining;

bool passed(const CUstream_st *s, uint64_t ticket) {
  return s->q.empty() || s->q.front()->seq >= ticket;
}

void maybe_free(CUstream_st *s) {
  if (!s->destroyed || !s->q.empty() || s->event_refs) return;
  streams.erase(s);
  delete s;
}

/* Lets go of the stream an event refers to once it has passed; true when
 * the event is complete. */
bool event_done(CUevent_st *e) {
  if (!e->stream) return true;
  if (!passed(e->stream, e->ticket)) return false;
  CUstream_st *s = e->stream;
  e->stream = nullptr;
  s->event_refs--;
  maybe_free(s);
  if (!e->timed) e->at = std::chrono::steady_clock::now(), e->timed = true;
  return true;
}

/* cudaStreamWaitEvent on a pending event: holds its stream until the
 * recorded stream passes the ticket. */
struct event_wait : mt_emu::async_item {
  CUstream_st *on;
  uint64_t ticket;
  bool started = false;
  void start() override { started = true; }
  void on_demand() override;
};
std::vector<event_wait *> waits;

void (*run_demanded)(void); /* nccl_emu's, when linked */

/* Marks s's items queued before `before` (a NULL s: those of every stream of
 * the current device). Marking moves nothing, so the queues hold still. */
void mark(CUstream_st *s, uint64_t before) {
  if (!s) {
    for (CUstream_st *t : streams)
      if (t->device == current_dev) mark(t, before);
    return;
  }
  for (mt_emu::async_item *it : s->q) {
    if (it->seq >= before) break;
    if (it->demanded) continue;
    it->demanded = true;
    it->on_demand();
  }
}

/* The waiting stream needs what the event stands behind. */
void event_wait::on_demand() { mark(on, ticket); }

void drain();

void demand_now(CUstream_st *s, uint64_t before) {
  mark(s, before);
  if (run_demanded) run_demanded();
  drain();
}

/* Starts items that reached the head of their stream and completes event
 * waits whose event has passed, until nothing moves; then wakes waiters. */
void drain() {
  if (draining) return;
  draining = true;
  for (;;) {
    if (!to_start.empty()) {
      mt_emu::async_item *it = to_start.front();
      to_start.erase(to_start.begin());
      it->start();
      continue;
    }
    event_wait *ready = nullptr;
    for (event_wait *w : waits)
      if (w->started && passed(w->on, w->ticket)) {
        ready = w;
        break;
      }
    if (!ready) break;
    waits.erase(std::find(waits.begin(), waits.end(), ready));
    ready->on->event_refs--;
    maybe_free(ready->on);
    mt_emu::async_complete(ready);
    delete ready;
  }
  draining = false;
  acv.notify_all();
}

CUstream_st *live_stream(cudaStream_t s, const char *what) {
  if (s && (!streams.count(s) || s->destroyed))
    EMU_DIE("%s: %p is not a live stream", what, (void *)s);
  return s;
}

CUevent_st *live_event(cudaEvent_t e, const char *what) {
  if (!e || !events.count(e)) EMU_DIE("%s: %p is not a live event", what, (void *)e);
  return e;
}

/* s is idle; the legacy default stream (NULL) is idle when every blocking
 * stream of the current device is. */
bool idle(CUstream_st *s) {
  if (s) return s->q.empty();
  for (CUstream_st *t : streams)
    if (t->device == current_dev && !(t->flags & cudaStreamNonBlocking) && !t->q.empty())
      return false;
  return true;
}

std::string queued_on(CUstream_st *s) {
  if (s && !s->q.empty()) return s->q.front()->desc;
  for (CUstream_st *t : streams)
    if (t->device == current_dev && !t->q.empty()) return t->q.front()->desc;
  return "?";
}

/* Work that runs when issued waits here for what is queued before it. */
void wait_idle(cudaStream_t s, const char *what) {
  std::unique_lock<std::mutex> lk(amu);
  CUstream_st *st = live_stream(s, what);
  if (idle(st)) return;
  demand_now(st, UINT64_MAX);
  if (idle(st)) return;
  std::string w = std::string(what) + " waits for " + queued_on(st);
  mt_emu::async_wait(lk, w.c_str(), [st] { return idle(st); });
}

/* One kernel at a time: its blocks use the emulator's globals. */
std::mutex launch_mu;
std::map<std::string, long> launches;     /* by kernel name, under launch_mu */
std::map<std::string, long> last_threads; /* the last launch's threads a block, by name */
std::map<int, int> profiling;             /* cudaProfilerStart's capture on, by device */
std::map<int, long> profiled;             /* launches made with it on, by device */
std::string fail_name;                    /* mt_emu_fail_launch's kernel, under launch_mu */
long fail_at;                             /* and its launch count then: 0, none armed */
void (*fault_sync_fn)(int, void *);       /* mt_emu_on_fault_sync's, under launch_mu */
void *fault_sync_arg;
thread_local cudaStream_t faulted_stream; /* the failed launch's, on its thread, until it syncs */

void before_launch(cudaStream_t s, const char *name) {
  std::string what = std::string("kernel ") + name;
  wait_idle(s, what.c_str());
  std::lock_guard<std::mutex> lk(amu);
  if (s && s->device != current_dev)
    EMU_DIE("kernel %s: launched on a stream of device %d while device %d is current", name,
            s->device, current_dev);
}

} // namespace

std::mutex &mt_emu::async_mutex() { return amu; }

void mt_emu::async_enqueue(cudaStream_t s, async_item *it) {
  if (!s || !streams.count(s) || s->destroyed)
    EMU_DIE("%s: queued on %p, not a live stream", it->desc.c_str(), (void *)s);
  it->stream = s;
  it->seq = s->next_seq++;
  s->q.push_back(it);
  if (s->q.size() == 1) to_start.push_back(it);
  drain();
}

void mt_emu::async_complete(async_item *it) {
  CUstream_st *s = it->stream;
  auto pos = std::find(s->q.begin(), s->q.end(), it);
  if (pos == s->q.end()) EMU_DIE("%s: completed twice", it->desc.c_str());
  bool head = pos == s->q.begin();
  s->q.erase(pos);
  auto ts = std::find(to_start.begin(), to_start.end(), it);
  if (ts != to_start.end()) to_start.erase(ts);
  if (head && !s->q.empty()) to_start.push_back(s->q.front());
  maybe_free(s);
  drain();
}

void mt_emu::async_wait(std::unique_lock<std::mutex> &lk, const char *what,
                        const std::function<bool()> &done) {
  int waited_s = 0;
  while (!done()) {
    if (acv.wait_for(lk, std::chrono::seconds(30)) == std::cv_status::timeout && !done()) {
      waited_s += 30;
      fprintf(stderr, "cuda_emu: %s: still waiting after %d s\n", what, waited_s);
    }
  }
}

void mt_emu::async_notify() { acv.notify_all(); }

void mt_emu::mark_demanded(cudaStream_t s, uint64_t before) { mark(s, before); }

void mt_emu::demand(cudaStream_t s, uint64_t before) { demand_now(s, before); }

void mt_emu::set_demand_runner(void (*run)(void)) { run_demanded = run; }

int mt_emu::stream_device(cudaStream_t s) {
  if (!s || !streams.count(s) || s->destroyed) EMU_DIE("%p is not a live stream", (void *)s);
  return s->device;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
  std::lock_guard<std::mutex> lk(amu);
  CUstream_st *st = new CUstream_st();
  st->device = current_dev;
  st->flags = flags;
  streams.insert(st);
  *s = st;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) {
  return cudaStreamCreateWithFlags(s, cudaStreamDefault);
}

/* As in CUDA, queued work still runs; the stream goes once it has. */
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  std::lock_guard<std::mutex> lk(amu);
  if (!s) return last_error = cudaErrorInvalidResourceHandle;
  live_stream(s, "cudaStreamDestroy");
  s->destroyed = true;
  maybe_free(s);
  return cudaSuccess;
}

static std::map<int, cudaError_t> lost_devices; /* mt_emu_lose_device's, under amu */

/* The error device dev answers every call with once lost, cudaSuccess while
 * it is not; under amu */
static cudaError_t lost_error(int dev) {
  auto lost = lost_devices.find(dev);
  return lost == lost_devices.end() ? cudaSuccess : lost->second;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  wait_idle(s, "cudaStreamSynchronize");
  {
    std::lock_guard<std::mutex> lk(amu);
    cudaError_t e = lost_error(s ? s->device : current_dev);
    if (e != cudaSuccess) return last_error = e;
  }
  if (s && s == faulted_stream) {
    faulted_stream = NULL;
    void (*fn)(int, void *);
    void *arg;
    {
      std::lock_guard<std::mutex> lk(launch_mu);
      fn = fault_sync_fn, arg = fault_sync_arg;
      fault_sync_fn = NULL;
    }
    if (fn) fn(s->device, arg);
  }
  return cudaSuccess;
}

void mt_emu_lose_device(int dev, cudaError_t e) {
  std::lock_guard<std::mutex> lk(amu);
  if (e == cudaSuccess)
    lost_devices.erase(dev);
  else
    lost_devices[dev] = e;
}

cudaError_t cudaStreamQuery(cudaStream_t s) {
  std::lock_guard<std::mutex> lk(amu);
  CUstream_st *st = live_stream(s, "cudaStreamQuery");
  cudaError_t e = lost_error(st ? st->device : current_dev);
  if (e != cudaSuccess) return last_error = e;
  if (!idle(st)) demand_now(st, UINT64_MAX);
  return idle(st) ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
  if (flags & ~(unsigned)(cudaEventBlockingSync | cudaEventDisableTiming))
    return last_error = cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(amu);
  CUevent_st *ev = new CUevent_st();
  ev->flags = flags;
  events.insert(ev);
  *e = ev;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *e) {
  return cudaEventCreateWithFlags(e, cudaEventDefault);
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  std::lock_guard<std::mutex> lk(amu);
  live_event(e, "cudaEventRecord");
  CUstream_st *st = live_stream(s, "cudaEventRecord");
  if (!st) EMU_DIE("cudaEventRecord on the legacy default stream: not emulated");
  if (e->stream) { /* a record replaces the last one */
    e->stream->event_refs--;
    maybe_free(e->stream);
    e->stream = nullptr;
  }
  e->recorded = true;
  e->timed = false;
  if (st->q.empty()) {
    e->at = std::chrono::steady_clock::now(), e->timed = true;
  } else {
    e->stream = st;
    e->ticket = st->next_seq;
    st->event_refs++;
  }
  return cudaSuccess;
}

/* The host waits for a pending event: what it stands behind is demanded. */
static void demand_event(CUevent_st *e) {
  if (e->stream && !passed(e->stream, e->ticket)) demand_now(e->stream, e->ticket);
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
  std::lock_guard<std::mutex> lk(amu);
  demand_event(live_event(e, "cudaEventQuery"));
  return event_done(e) ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  std::unique_lock<std::mutex> lk(amu);
  demand_event(live_event(e, "cudaEventSynchronize"));
  mt_emu::async_wait(lk, "cudaEventSynchronize", [e] { return event_done(e); });
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
  std::lock_guard<std::mutex> lk(amu);
  live_event(start, "cudaEventElapsedTime");
  live_event(end, "cudaEventElapsedTime");
  if ((start->flags | end->flags) & cudaEventDisableTiming || !start->recorded || !end->recorded)
    return last_error = cudaErrorInvalidResourceHandle;
  if (!event_done(start) || !event_done(end)) return last_error = cudaErrorNotReady;
  *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
  return cudaSuccess;
}

/* A pending event is let go of; CUDA frees it once it completes. */
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  std::lock_guard<std::mutex> lk(amu);
  live_event(e, "cudaEventDestroy");
  if (e->stream) {
    e->stream->event_refs--;
    maybe_free(e->stream);
  }
  events.erase(e);
  delete e;
  return cudaSuccess;
}

/* Work issued on s after this waits for e's last record. On the legacy
 * default stream (or with e recorded on s itself) nothing is queued: the
 * host thread waits, or nothing needs to. */
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
  (void)flags;
  std::unique_lock<std::mutex> lk(amu);
  CUstream_st *st = live_stream(s, "cudaStreamWaitEvent");
  live_event(e, "cudaStreamWaitEvent");
  if (event_done(e) || e->stream == st) return cudaSuccess;
  if (!st) {
    demand_event(e);
    mt_emu::async_wait(lk, "cudaStreamWaitEvent on the legacy stream",
                       [e] { return event_done(e); });
    return cudaSuccess;
  }
  event_wait *w = new event_wait();
  w->on = e->stream;
  w->ticket = e->ticket;
  w->on->event_refs++;
  w->desc = "a wait for an event behind " + e->stream->q.back()->desc;
  waits.push_back(w);
  mt_emu::async_enqueue(st, w);
  return cudaSuccess;
}

/* Each allocation ends at an inaccessible page, so a kernel that writes or
 * reads past the end of a buffer faults at once instead of corrupting a
 * neighbour. The buffer ends where its size, rounded up to 32 bytes, ends
 * (not where cudaMalloc's 256-byte rounding would: on a GPU an overrun
 * into that slack goes unseen, here it faults), so it starts aligned to
 * 256 bytes, as cudaMalloc's, when that size is a multiple of 256, else to
 * the largest power of two dividing it (at least 32: a wmma pointer's
 * alignment). */
cudaError_t cudaMalloc(void **p, size_t bytes) {
  size_t charged = (bytes + 255) & ~(size_t)255, page = 4096;
  size_t tight = (bytes + 31) & ~(size_t)31;
  if (!charged) charged = 256, tight = 32;
  size_t map = (tight + page - 1) / page * page + page;
  {
    std::lock_guard<std::mutex> lk(mem_mu);
    if (device_bytes[current_dev] + charged > emu_memory_bytes())
      return last_error = cudaErrorMemoryAllocation;
    device_bytes[current_dev] += charged;
  }
  char *m = (char *)mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    std::lock_guard<std::mutex> lk(mem_mu);
    device_bytes[current_dev] -= charged;
    return last_error = cudaErrorMemoryAllocation;
  }
  mprotect(m + map - page, page, PROT_NONE);
  *p = m + map - page - tight;
  memset(*p, 0xFF, tight); /* NaN in every float: reading unwritten memory shows */
  std::lock_guard<std::mutex> lk(mem_mu);
  allocations[(uintptr_t)*p] = allocation{tight, charged, current_dev, m, map};
  return cudaSuccess;
}

/* As in CUDA, waits for the work queued on the allocation's device. */
cudaError_t cudaFree(void *p) {
  if (!p) return cudaSuccess;
  int dev;
  {
    std::lock_guard<std::mutex> lk(mem_mu);
    auto it = allocations.find((uintptr_t)p);
    if (it == allocations.end()) EMU_DIE("cudaFree(%p): not an allocation", p);
    dev = it->second.device;
  }
  {
    std::unique_lock<std::mutex> lk(amu);
    auto device_idle = [dev] {
      for (CUstream_st *t : streams)
        if (t->device == dev && !t->q.empty()) return false;
      return true;
    };
    for (CUstream_st *t : streams)
      if (t->device == dev) mark(t, UINT64_MAX);
    demand_now(nullptr, 0); /* runs what was marked */
    mt_emu::async_wait(lk, "cudaFree", device_idle);
  }
  std::lock_guard<std::mutex> lk(mem_mu);
  auto it = allocations.find((uintptr_t)p);
  if (it == allocations.end()) EMU_DIE("cudaFree(%p): freed twice at once", p);
  allocation a = it->second;
  device_bytes[a.device] -= a.charged;
  allocations.erase(it);
  munmap(a.map, a.map_bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s) {
  if (!is_device(p, bytes)) EMU_DIE("cudaMemsetAsync(%p, %zu bytes): not device memory", p, bytes);
  wait_idle(s, "cudaMemsetAsync");
  memset(p, v, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t s) {
  int want_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  int want_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (is_device(dst, bytes) != want_dst || is_device(src, bytes) != want_src)
    EMU_DIE("cudaMemcpyAsync kind %d: dst %p is %s, src %p is %s", (int)kind, dst,
            is_device(dst, bytes) ? "device" : "host", src,
            is_device(src, bytes) ? "device" : "host");
  wait_idle(s, "cudaMemcpyAsync");
  memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "cudaSuccess";
  case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
  case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
  case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
  case cudaErrorNoDevice: return "cudaErrorNoDevice";
  case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
  case cudaErrorNotReady: return "cudaErrorNotReady";
  case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
  }
  return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

/* ---- kernels: blocks in turn, threads as fibers -------------------------- */

namespace mt_emu {

uint3 *cur_tid;
uint3 block_idx;
dim3 block_dim, grid_dim;

namespace {

struct barrier {
  int arrived, live;
  unsigned gen;
  int acc, result[2]; /* __syncthreads_count: the sum, kept per generation parity */
};

/* Switching fibers: on x86-64 a few instructions that save the callee-saved
 * registers on the old stack and load them from the new one; glibc's
 * swapcontext also saves the signal mask, a system call per switch that
 * made the emulator ten times slower. Elsewhere, swapcontext. */
#if defined(__x86_64__) && defined(__GNUC__)
#define FAST_SWITCH 1
extern "C" void mt_emu_swap(void **save_sp, void *load_sp);
__asm__(".text\n"
        ".globl mt_emu_swap\n"
        ".type mt_emu_swap,@function\n"
        "mt_emu_swap:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size mt_emu_swap, .-mt_emu_swap\n");
#else
#define FAST_SWITCH 0
#endif

/* A cp.async copy: its 16 bytes read at issue (the source is global memory,
 * which no kernel here writes before the copy's wait: the dQ kernel writes
 * where it loaded dO from, after it), written to dst when it lands; group 0
 * until committed, then the thread's group count. */
struct async_copy {
  unsigned char *dst;
  unsigned char bytes[16];
  unsigned long group;
  bool landed;
};

struct fiber {
#if FAST_SWITCH
  void *sp;
#else
  ucontext_t ctx;
#endif
  char *stack_lo; /* its stack: [stack_lo, stack_lo + stack_bytes) */
  size_t stack_bytes;
  void *asan_fake; /* AddressSanitizer's fake stack while it is switched out */
  uint3 tid;
  unsigned linear, warp, lane;
  int done;
  const barrier *wait_on;         /* the barrier it waits at, or NULL */
  unsigned wait_gen;              /* for that barrier's generation to pass */
  std::vector<async_copy> copies; /* its cp.async copies not waited for */
  unsigned long groups;           /* its cp.async groups committed */
};

#ifdef MT_ASAN
const size_t STACK_BYTES = 256 << 10; /* instrumented frames, with their redzones */
#else
const size_t STACK_BYTES = 128 << 10;
#endif
#if FAST_SWITCH
void *sched_sp;
#else
ucontext_t sched;
#endif
#ifdef MT_ASAN
/* The scheduler's stack (the launching thread's), learnt from
 * AddressSanitizer at the first switch from it of each launch */
const void *sched_stack_lo;
size_t sched_stack_bytes;
void *sched_asan_fake;
bool from_sched;
#endif
std::vector<fiber> fibers;
char *stacks; /* 1024 stacks, mapped once, pages committed as touched */
fiber *cur;
size_t turn; /* cur's place in the pass: fibers in index order, or reversed */
size_t live; /* fibers of the block not yet done */
/* MT_CUDA_EMU_ORDER: "reverse" (fibers in reverse index order), "warps"
 * (a warp runs alone until it waits at a block barrier or ends: warps in
 * index order) or "warps-reverse" (the same, warps and lanes in reverse) */
const char *order_env = getenv("MT_CUDA_EMU_ORDER");
bool reversed = order_env && (!strcmp(order_env, "reverse") || !strcmp(order_env, "warps-reverse"));
bool warp_serial =
    order_env && (!strcmp(order_env, "warps") || !strcmp(order_env, "warps-reverse"));
bool order_known =
    !order_env || !*order_env || !strcmp(order_env, "forward") || reversed || warp_serial;
/* MT_CUDA_EMU_CP_ASYNC=late: cp.async copies land at their wait */
std::atomic<bool> cp_late{getenv("MT_CUDA_EMU_CP_ASYNC") &&
                          !strcmp(getenv("MT_CUDA_EMU_CP_ASYNC"), "late")};
const char *kernel_name; /* the launch running */
barrier blk;
std::vector<barrier> warps;
/* Two per thread, by the parity of its warp barrier's generation: a lane
 * writes its value for barrier g into half g & 1 and reads the others'
 * there after g; the next write to that half is for g + 2, which no lane
 * reaches before every lane has passed g + 1, so has read. One barrier per
 * shuffle or ballot, as on a GPU. */
std::vector<uint64_t> slots;
std::vector<float> frags; /* the same for mma_sync: 16 floats a lane, two halves */
unsigned long epoch;      /* counts releases and exits: progress */
const std::function<void()> *body;

/* AddressSanitizer: a fiber's code runs again, after a switch to it */
void switched_in(void *fake) {
#ifdef MT_ASAN
  const void *lo;
  size_t bytes;
  __sanitizer_finish_switch_fiber(fake, &lo, &bytes);
  if (from_sched) sched_stack_lo = lo, sched_stack_bytes = bytes, from_sched = false;
#else
  (void)fake;
#endif
}

/* From fiber `from` to fiber `to` (NULL: the scheduler). A finished fiber
 * leaves for good: AddressSanitizer drops its fake stack. */
EMU_TSAN_OFF void switch_to(fiber *from, fiber *to) {
#ifdef MT_ASAN
  __sanitizer_start_switch_fiber(from->done ? NULL : &from->asan_fake,
                                 to ? to->stack_lo : sched_stack_lo,
                                 to ? to->stack_bytes : sched_stack_bytes);
#endif
#if FAST_SWITCH
  mt_emu_swap(&from->sp, to ? to->sp : sched_sp);
#else
  swapcontext(&from->ctx, to ? &to->ctx : &sched);
#endif
  switched_in(from->asan_fake);
}

bool runnable(const fiber &f) { return !f.done && (!f.wait_on || f.wait_on->gen != f.wait_gen); }

/* The next fiber of the pass after `after` that can run, as turn and
 * fiber; NULL when the pass is over. */
fiber *next_in_pass(size_t after, size_t *t) {
  size_t n = fibers.size();
  for (size_t k = after; k < n; k++) {
    fiber &f = fibers[reversed ? n - 1 - k : k];
    if (runnable(f)) {
      *t = k;
      return &f;
    }
  }
  return nullptr;
}

/* cur gives up its turn, straight to the next fiber of the pass that can
 * run, or to the scheduler once the pass is over. A fiber waiting at a
 * barrier that has not completed is passed over: resumed, it would only
 * yield again, so the order of what runs is that of resuming every fiber
 * in turn, at one switch a turn instead of two per fiber. */
EMU_TSAN_OFF void yield() {
  fiber *from = cur;
  size_t t;
  fiber *to = nullptr;
  if (warp_serial) {
    /* the next lane of this warp that can run, in the pass's order, round
     * the warp: the warp goes on alone while it can */
    size_t n = fibers.size(), w0 = (size_t)cur->warp * 32, wn = n - w0 < 32 ? n - w0 : 32;
    for (size_t k = 1; k <= wn && !to; k++) {
      size_t l = reversed ? (cur->lane + wn - k) % wn : (cur->lane + k) % wn;
      fiber &f = fibers[w0 + l];
      if (runnable(f)) {
        to = &f;
        t = reversed ? n - 1 - (w0 + l) : w0 + l;
      }
    }
  }
  if (!to) to = next_in_pass(turn + 1, &t);
  if (to) {
    turn = t;
    cur = to;
    cur_tid = &to->tid;
  }
  switch_to(from, to);
}

void release(barrier &b) {
  b.result[b.gen & 1] = b.acc;
  b.acc = 0;
  b.arrived = 0;
  b.gen++;
  epoch++;
}

/* The calling fiber arrives; returns the generation it waited for. */
unsigned arrive(barrier &b) {
  unsigned g = b.gen;
  if (++b.arrived == b.live) release(b);
  while (b.gen == g) {
    cur->wait_on = &b, cur->wait_gen = g;
    yield();
  }
  cur->wait_on = nullptr;
  return g;
}

/* An exited thread no longer counts: __syncthreads completes without it. */
void leave(barrier &b) {
  b.live--;
  if (b.arrived && b.arrived == b.live) release(b);
}

EMU_TSAN_OFF void entry() {
  switched_in(NULL);
  (*body)();
  if (!cur->copies.empty())
    EMU_DIE("kernel %s block (%u,%u,%u) thread (%u,%u,%u): it ends with %zu cp.async copies "
            "not waited for (cp.async.wait_group)",
            kernel_name, block_idx.x, block_idx.y, block_idx.z, cur->tid.x, cur->tid.y, cur->tid.z,
            cur->copies.size());
  cur->done = 1;
  live--;
  leave(blk);
  leave(warps[cur->warp]);
  epoch++;
  yield(); /* for good: a finished fiber is never resumed */
  abort();
}

/* A new fiber on stack [lo, lo + bytes), starting in entry(). */
void start(fiber &f, char *lo, size_t bytes) {
  f.stack_lo = lo, f.stack_bytes = bytes, f.asan_fake = NULL;
#if FAST_SWITCH
  /* what mt_emu_swap pops: six registers, then entry() as the return
   * address; entry() then starts with rsp = 8 mod 16, as after a call */
  uintptr_t top = ((uintptr_t)(lo + bytes) & ~(uintptr_t)15) - 64;
  void **sp = (void **)top;
  for (int i = 0; i < 6; i++) sp[i] = NULL;
  sp[6] = (void *)entry;
  sp[7] = NULL;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = lo;
  f.ctx.uc_stack.ss_size = bytes;
  f.ctx.uc_link = &sched;
  makecontext(&f.ctx, entry, 0);
#endif
}

/* From the scheduler to f, at turn t of a pass; back at the pass's end. */
void resume(fiber &f, size_t t) {
  turn = t;
  cur = &f;
  cur_tid = &f.tid;
#ifdef MT_ASAN
  from_sched = true;
  __sanitizer_start_switch_fiber(&sched_asan_fake, f.stack_lo, f.stack_bytes);
#endif
#if FAST_SWITCH
  mt_emu_swap(&sched_sp, f.sp);
#else
  swapcontext(&sched, &f.ctx);
#endif
#ifdef MT_ASAN
  __sanitizer_finish_switch_fiber(sched_asan_fake, NULL, NULL);
#endif
}

void warp_sync() { arrive(warps[cur->warp]); }

/* Dynamic shared memory: the launch's buffer, 128-byte aligned and of the
 * launch's size exactly (AddressSanitizer stops a read or write past its
 * end), and the limits cudaFuncSetAttribute raised (by kernel, under
 * launch_mu). */
unsigned char *smem_ptr;
std::map<const void *, int> smem_limits;
const size_t SMEM_DEFAULT = 48 << 10, SMEM_MAX = 227 << 10;

} // namespace

unsigned char *dyn_smem() { return smem_ptr; }

const void *vec_at(const void *p, size_t align, const char *type) {
  if ((uintptr_t)p % align)
    EMU_DIE("kernel %s: a %s (%zu bytes aligned) at %p: misaligned (a GPU faults)", kernel_name,
            type, align, p);
  return p;
}

int smem_optin() {
  const char *e = getenv("MT_CUDA_EMU_SMEM_OPTIN");
  long v = e && *e ? strtol(e, NULL, 10) : 0;
  return v > 0 && (size_t)v < SMEM_MAX ? (int)v : (int)SMEM_MAX;
}

bool set_smem_limit(const void *k, int bytes) {
  if (bytes > smem_optin()) return false; /* as CUDA: the kernel keeps its old limit */
  std::lock_guard<std::mutex> lk(launch_mu);
  smem_limits[k] = bytes;
  return true;
}

unsigned lane() { return cur->lane; }

void warp_barrier() { warp_sync(); }

const float *warp_gather(const float *mine) {
  barrier &w = warps[cur->warp];
  float *half = &frags[(w.gen & 1) * fibers.size() * 16];
  memcpy(half + cur->linear * 16, mine, 16 * sizeof *mine);
  arrive(w);
  return half + cur->warp * 32 * 16;
}

void syncthreads() { arrive(blk); }

int syncthreads_count(int pred) {
  blk.acc += pred;
  unsigned g = arrive(blk);
  return blk.result[g & 1];
}

void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) EMU_DIE("warp mask 0x%08x: only full warps are emulated", mask);
}

uint64_t shfl_xor(uint64_t bits, int lane_mask) {
  unsigned base = cur->warp * 32, src = cur->lane ^ (unsigned)lane_mask;
  if (lane_mask < 0 || lane_mask > 31) EMU_DIE("shuffle lane mask %d", lane_mask);
  barrier &w = warps[cur->warp];
  uint64_t *half = &slots[(w.gen & 1) * fibers.size()];
  half[cur->linear] = bits;
  arrive(w);
  return half[base + src];
}

uint64_t shfl_idx(uint64_t bits, int src_lane) {
  unsigned base = cur->warp * 32;
  if (src_lane < 0 || src_lane > 31) EMU_DIE("shuffle source lane %d", src_lane);
  barrier &w = warps[cur->warp];
  uint64_t *half = &slots[(w.gen & 1) * fibers.size()];
  half[cur->linear] = bits;
  arrive(w);
  return half[base + (unsigned)src_lane];
}

void cp_async(void *dst, const void *src) {
  if ((uintptr_t)dst % 16 || (uintptr_t)src % 16)
    EMU_DIE("kernel %s: cp.async of 16 bytes from %p to %p, not 16-byte aligned", kernel_name, src,
            dst);
  async_copy c;
  c.dst = (unsigned char *)dst;
  if (src)
    memcpy(c.bytes, src, 16);
  else
    memset(c.bytes, 0, 16);
  c.group = 0;
  c.landed = !cp_late;
  if (c.landed) memcpy(c.dst, c.bytes, 16);
  cur->copies.push_back(c);
}

void cp_async_commit() {
  cur->groups++;
  for (async_copy &c : cur->copies)
    if (!c.group) c.group = cur->groups;
}

void cp_async_wait(int n) {
  if (n < 0) EMU_DIE("kernel %s: cp.async.wait_group %d", kernel_name, n);
  std::vector<async_copy> &v = cur->copies;
  size_t kept = 0;
  for (size_t i = 0; i < v.size(); i++) {
    async_copy &c = v[i];
    if (c.group && c.group + (unsigned long)n <= cur->groups) {
      if (!c.landed) memcpy(c.dst, c.bytes, 16);
    } else {
      v[kept++] = c;
    }
  }
  v.resize(kept);
}

unsigned ballot(int pred) {
  unsigned base = cur->warp * 32;
  barrier &w = warps[cur->warp];
  uint64_t *half = &slots[(w.gen & 1) * fibers.size()];
  /* the vote carries the barrier's generation: a lane that exits after its
   * vote, before a slower lane reads, still counts, and a lane that exited
   * before it (its slot holds an older vote) does not */
  uint64_t tag = (uint64_t)w.gen << 1;
  half[cur->linear] = tag | (uint64_t)(pred != 0);
  arrive(w);
  unsigned r = 0;
  for (unsigned l = 0; l < 32 && base + l < fibers.size(); l++)
    if (half[base + l] == (tag | 1)) r |= 1u << l;
  return r;
}

void run(const char *name, dim3 grid, dim3 block, cudaStream_t s, const std::function<void()> &b,
         const void *kernel, size_t smem) {
  before_launch(s, name);
  std::lock_guard<std::mutex> one_at_a_time(launch_mu);
  long nth = ++launches[name];
  last_threads[name] = (long)block.x * block.y * block.z;
  if (profiling[current_dev]) profiled[current_dev]++;
  if (fail_at && nth == fail_at && fail_name == name) {
    fail_at = 0;
    faulted_stream = s;
    last_error = cudaErrorLaunchFailure;
    return;
  }
  if (smem > SMEM_DEFAULT) {
    auto it = smem_limits.find(kernel);
    if (it == smem_limits.end() || (size_t)it->second < smem)
      EMU_DIE("kernel %s: %zu bytes of dynamic shared memory, over 48 KiB without "
              "cudaFuncAttributeMaxDynamicSharedMemorySize set that high",
              name, smem);
  }
  free(smem_ptr);
  smem_ptr = NULL;
  if (smem && posix_memalign((void **)&smem_ptr, 128, smem))
    EMU_DIE("kernel %s: cannot allocate %zu bytes of shared memory", name, smem);
  size_t nthreads = (size_t)block.x * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || !nthreads || nthreads > 1024 || block.z > 64 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (nthreads % 32) EMU_DIE("kernel %s: %zu threads per block, not whole warps", name, nthreads);
  if (!stacks) {
    stacks = (char *)mmap(NULL, 1024 * STACK_BYTES, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == MAP_FAILED) EMU_DIE("cannot map fiber stacks");
  }
  if (!order_known)
    EMU_DIE("MT_CUDA_EMU_ORDER=%s: not forward, reverse, warps or warps-reverse", order_env);
  body = &b;
  kernel_name = name;
  grid_dim = grid;
  block_dim = block;
  fibers.assign(nthreads, fiber());
  slots.assign(2 * nthreads, 0);
  frags.assign(2 * nthreads * 16, 0.0f);
  warps.assign((nthreads + 31) / 32, barrier());
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        block_idx = {x, y, z};
        if (smem) memset(smem_ptr, 0xff, smem); /* NaN until written */
        blk = barrier();
        blk.live = (int)nthreads;
        for (size_t w = 0; w < warps.size(); w++) {
          warps[w] = barrier();
          warps[w].live = 32;
        }
        /* the warps' generations start over: so do the votes they tag */
        std::fill(slots.begin(), slots.end(), 0);
        for (size_t i = 0; i < nthreads; i++) {
          fiber &f = fibers[i];
          f.tid = {(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                   (unsigned)(i / ((size_t)block.x * block.y))};
          f.linear = (unsigned)i, f.warp = (unsigned)(i / 32), f.lane = (unsigned)(i % 32);
          f.done = 0;
          f.wait_on = nullptr;
          f.copies.clear();
          f.groups = 0;
          /* the tops of the stacks, 128 KiB apart, would all fall in one
           * cache set: each is moved down by its own multiple of 64 bytes */
          start(f, stacks + i * STACK_BYTES, STACK_BYTES - (i * 33 % 256) * 64);
        }
        live = nthreads;
        while (live) {
          unsigned long before = epoch;
          size_t t;
          fiber *f = next_in_pass(0, &t);
          if (f) resume(*f, t); /* the pass: back here after its last turn */
          if (live && epoch == before)
            EMU_DIE("kernel %s block (%u,%u,%u): deadlock: threads wait at barriers that never "
                    "complete",
                    name, x, y, z);
        }
      }
}

std::atomic<long> gemms_lt, gemms_lt_gelu, gemms_lt_dgelu, gemms_blas, gemms_16bit, heuristics;
int lt_disabled;

} // namespace mt_emu

void nvcuda::wmma::detail::check(const void *p, unsigned ldm, unsigned multiple, const char *what) {
  if ((uintptr_t)p % 32) EMU_DIE("wmma::%s: pointer %p is not 256-bit aligned", what, p);
  if (ldm % multiple) EMU_DIE("wmma::%s: ldm %u is not a multiple of %u", what, ldm, multiple);
}

int nvcuda::wmma::detail::acc_sm80 = 1;
void mt_emu_set_acc_layout(int sm80) { nvcuda::wmma::detail::acc_sm80 = sm80 != 0; }
int nvcuda::wmma::detail::a_mma = 1;
void mt_emu_set_a_layout(int mma) { nvcuda::wmma::detail::a_mma = mma != 0; }

void mt_emu_set_cp_async_late(int late) { mt_emu::cp_late = late != 0; }

void mt_emu_set_order(int reverse, int warps) {
  std::lock_guard<std::mutex> lk(launch_mu); /* not while a kernel runs */
  mt_emu::reversed = reverse != 0, mt_emu::warp_serial = warps != 0;
}

void mt_emu_gemm_counts(long *lt, long *lt_gelu, long *lt_dgelu, long *blas) {
  *lt = mt_emu::gemms_lt, *lt_gelu = mt_emu::gemms_lt_gelu, *lt_dgelu = mt_emu::gemms_lt_dgelu;
  *blas = mt_emu::gemms_blas;
}

long mt_emu_gemm16_count(void) { return mt_emu::gemms_16bit; }

long mt_emu_heuristic_count(void) { return mt_emu::heuristics; }

void mt_emu_fail_launch(const char *kernel, long n) {
  std::lock_guard<std::mutex> lk(launch_mu);
  fail_name = kernel;
  fail_at = n > 0 ? launches[kernel] + n : 0;
}

void mt_emu_on_fault_sync(void (*fn)(int dev, void *arg), void *arg) {
  std::lock_guard<std::mutex> lk(launch_mu);
  fault_sync_fn = fn, fault_sync_arg = arg;
}

cudaError_t cudaProfilerStart(void) {
  std::lock_guard<std::mutex> lk(launch_mu);
  profiling[current_dev] = 1;
  return cudaSuccess;
}

cudaError_t cudaProfilerStop(void) {
  std::lock_guard<std::mutex> lk(launch_mu);
  profiling[current_dev] = 0;
  return cudaSuccess;
}

long mt_emu_profiled_launches(int dev) {
  std::lock_guard<std::mutex> lk(launch_mu);
  return profiled[dev];
}

int mt_emu_profiler_on(int dev) {
  std::lock_guard<std::mutex> lk(launch_mu);
  return profiling[dev];
}

long mt_emu_launch_count(const char *kernel) {
  std::lock_guard<std::mutex> lk(launch_mu);
  auto it = launches.find(kernel);
  return it == launches.end() ? 0 : it->second;
}

long mt_emu_launch_threads(const char *kernel) {
  std::lock_guard<std::mutex> lk(launch_mu);
  auto it = last_threads.find(kernel);
  return it == last_threads.end() ? 0 : it->second;
}

/* ---- GEMM --------------------------------------------------------------- */

struct emu_blas {
  cudaStream_t stream;
};
struct emu_lt {
  int dummy;
};
struct emu_desc {
  cublasComputeType_t compute;
  cublasOperation_t ta, tb;
  cublasLtEpilogue_t epilogue;
  const void *bias; /* m elements of D's type */
  void *aux;        /* GeLU epilogues: the GeLU input, written (GELU_AUX*) or read (DGELU) */
  int64_t aux_ld;   /* in elements */
  /* cudaDataType_t; -1, cuBLASLt's default: D's type */
  int32_t bias_type = -1, aux_type = -1;
};
struct emu_layout {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
  int32_t batch;
  int64_t stride;
};
struct emu_pref {
  uint32_t align[4]; /* A, B, C, D */
  uint64_t ws;
};

/* x rounded to what a tensor core multiplies: tf32 (10-bit mantissa) or bf16. */
static double round_input(float x, cublasComputeType_t compute) {
  if (compute == CUBLAS_COMPUTE_32F_FAST_16BF) return mt_bf16_to_f32(mt_f32_to_bf16(x));
  if (compute == CUBLAS_COMPUTE_32F_FAST_TF32 && isfinite(x)) {
    uint32_t u = mt_f32_bits(x);
    u += 0xFFFu + ((u >> 13) & 1u);
    return mt_f32_from_bits(u & ~0x1FFFu);
  }
  return x;
}

static uint32_t actual_alignment(const void *p) {
  uint32_t a = 256;
  while (a > 1 && ((uintptr_t)p & (a - 1))) a >>= 1;
  return a;
}

static size_t type_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

/* Element i of a matrix stored as t, as the exact float it holds. */
static float load(const void *p, cudaDataType_t t, size_t i) {
  if (t == CUDA_R_16BF) {
    mt_bf16 h = {((const uint16_t *)p)[i]};
    return mt_bf16_to_f32(h);
  }
  if (t == CUDA_R_16F) {
    mt_fp16 h = {((const uint16_t *)p)[i]};
    return mt_fp16_to_f32(h);
  }
  return ((const float *)p)[i];
}

/* Element i of a matrix stored as t set to v, rounded to nearest even when
 * t is 16-bit. */
static void store(void *p, cudaDataType_t t, size_t i, float v) {
  if (t == CUDA_R_16BF)
    ((uint16_t *)p)[i] = mt_f32_to_bf16(v).bits;
  else if (t == CUDA_R_16F)
    ((uint16_t *)p)[i] = mt_f32_to_fp16(v).bits;
  else
    ((float *)p)[i] = v;
}

/* The operand types cuBLAS(Lt) takes with fp32 scaling, as far as they are
 * emulated: A and B of one type, C and D of one type; fp32 A and B with fp32
 * C and D in any of the compute types here; bf16 or binary16 A and B in
 * CUBLAS_COMPUTE_32F (the FAST_* types are for fp32 operands) with fp32 C
 * and D or C and D of their own type. Anything else, a 16-bit D with fp32
 * or other 16-bit inputs among them, cuBLAS(Lt) does not take either. */
static cublasStatus_t check_types(cublasComputeType_t compute, cudaDataType_t at, cudaDataType_t bt,
                                  cudaDataType_t ct, cudaDataType_t dt) {
  if (at != bt || ct != dt) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (at != CUDA_R_32F && compute != CUBLAS_COMPUTE_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  return ct == CUDA_R_32F || ct == at ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
}

/* What the GeLU epilogues do to each result (see check_epilogue). */
enum { GELU_FWD = 1, GELU_BWD = 2 };

/* Column-major D = alpha·op(A)·op(B) + beta·C (+ bias); C is not read when
 * beta is 0, as cuBLAS does (so NaN in an output buffer does not leak). A
 * and B of types at and bt, C and D of type dt, the bias of bias_t (strides
 * and lds in their elements). op(A) and op(B) are rounded to the compute
 * type once, into rows of k, then each dot product runs in double in order
 * of k; the sum, to a float, is stored into D's type. gelu (one matrix
 * only): GELU_FWD stores that float into aux (D's type) and its GeLU into D,
 * GELU_BWD stores gelu'(aux, as the float it holds) times it into D. */
static void gemm(cublasComputeType_t compute, int ta, int tb, int m, int n, int k, float alpha,
                 const void *A, cudaDataType_t at, long lda, long long sA, const void *B,
                 cudaDataType_t bt, long ldb, long long sB, float beta, const void *C, long ldc,
                 long long sC, void *D, long ldd, long long sD, cudaDataType_t dt, int batch,
                 const void *bias, cudaDataType_t bias_t, int gelu, void *aux, long aux_ld) {
  size_t ea = type_bytes(at), eb = type_bytes(bt), ed = type_bytes(dt);
  std::vector<double> ra((size_t)m * k), rb((size_t)n * k);
  std::vector<float> out((size_t)m * n);
  for (int bi = 0; bi < batch; bi++) {
    const char *a = (const char *)A + bi * sA * (long long)ea;
    const char *b = (const char *)B + bi * sB * (long long)eb;
    const char *c = (const char *)C + bi * sC * (long long)ed;
    char *d = (char *)D + bi * sD * (long long)ed;
    if (!is_device(a, ea) || !is_device(b, eb) || !is_device(d, ed))
      EMU_DIE("gemm batch %d: an operand is not device memory", bi);
    for (size_t i = 0; i < (size_t)m; i++)
      for (size_t l = 0; l < (size_t)k; l++)
        ra[i * k + l] = round_input(load(a, at, ta ? i * lda + l : l * lda + i), compute);
    for (size_t j = 0; j < (size_t)n; j++)
      for (size_t l = 0; l < (size_t)k; l++)
        rb[j * k + l] = round_input(load(b, bt, tb ? l * ldb + j : j * ldb + l), compute);
    for (int j = 0; j < n; j++)
      for (int i = 0; i < m; i++) {
        const double *x = &ra[(size_t)i * k], *y = &rb[(size_t)j * k];
        double acc = 0.0;
        for (int l = 0; l < k; l++) acc += x[l] * y[l];
        double v = alpha * acc;
        if (beta != 0.0f) v += (double)beta * load(c, dt, (size_t)j * ldc + i);
        if (bias) v += load(bias, bias_t, i);
        out[(size_t)j * m + i] = (float)v;
      }
    for (int j = 0; j < n; j++)
      for (int i = 0; i < m; i++) {
        float v = out[(size_t)j * m + i];
        size_t ia = (size_t)j * aux_ld + i;
        if (gelu == GELU_FWD) {
          store(aux, dt, ia, v);
          v = mt_gelu(v);
        } else if (gelu == GELU_BWD) {
          v = mt_gelu_grad(load(aux, dt, ia)) * v;
        }
        store(d, dt, (size_t)j * ldd + i, v);
      }
  }
}

const char *cublasGetStatusString(cublasStatus_t st) {
  switch (st) {
  case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
  case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
  case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
  case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
  case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

cublasStatus_t cublasCreate(cublasHandle_t *h) {
  *h = new emu_blas{nullptr};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t, void *ws, size_t bytes) {
  if (!is_device(ws, bytes)) EMU_DIE("cublasSetWorkspace: not device memory");
  return CUBLAS_STATUS_SUCCESS;
}

static void check_dims(const char *what, int m, int n, int k, int ta, int tb, long lda, long ldb,
                       long ldc) {
  long arows = ta ? k : m, brows = tb ? n : k;
  if (m < 1 || n < 1 || k < 1 || lda < arows || ldb < brows || ldc < m)
    EMU_DIE("%s: m=%d n=%d k=%d ta=%d tb=%d lda=%ld ldb=%ld ldc=%ld", what, m, n, k, ta, tb, lda,
            ldb, ldc);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta,
                                          cublasOperation_t tb, int m, int n, int k,
                                          const void *alpha, const void *A, cudaDataType_t at,
                                          int lda, long long sA, const void *B, cudaDataType_t bt,
                                          int ldb, long long sB, const void *beta, void *C,
                                          cudaDataType_t ct, int ldc, long long sC, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t) {
  cublasStatus_t st = check_types(compute, at, bt, ct, ct);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  check_dims("cublasGemmStridedBatchedEx", m, n, k, ta, tb, lda, ldb, ldc);
  wait_idle(h->stream, "cublasGemmStridedBatchedEx");
  gemm(compute, ta == CUBLAS_OP_T, tb == CUBLAS_OP_T, m, n, k, *(const float *)alpha, A, at, lda,
       sA, B, bt, ldb, sB, *(const float *)beta, C, ldc, sC, C, ldc, sC, ct, batch, NULL, ct, 0,
       NULL, 0);
  mt_emu::gemms_blas++;
  if (at != CUDA_R_32F) mt_emu::gemms_16bit++;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
  *h = new emu_lt();
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
  if (scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  *d = new emu_desc{compute, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT, NULL, NULL, 0};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}

template <class T> static void get(T *dst, const void *buf, size_t bytes, const char *what) {
  if (bytes != sizeof *dst) EMU_DIE("%s: %zu bytes, want %zu", what, bytes, sizeof *dst);
  memcpy(dst, buf, sizeof *dst);
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                              cublasLtMatmulDescAttributes_t a, const void *buf,
                                              size_t bytes) {
  switch (a) {
  case CUBLASLT_MATMUL_DESC_TRANSA: get(&d->ta, buf, bytes, "TRANSA"); break;
  case CUBLASLT_MATMUL_DESC_TRANSB: get(&d->tb, buf, bytes, "TRANSB"); break;
  case CUBLASLT_MATMUL_DESC_EPILOGUE: get(&d->epilogue, buf, bytes, "EPILOGUE"); break;
  case CUBLASLT_MATMUL_DESC_BIAS_POINTER: get(&d->bias, buf, bytes, "BIAS_POINTER"); break;
  case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: get(&d->aux, buf, bytes, "AUX_POINTER"); break;
  case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: get(&d->aux_ld, buf, bytes, "AUX_LD"); break;
  case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE:
    get(&d->aux_type, buf, bytes, "AUX_DATA_TYPE");
    break;
  case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: get(&d->bias_type, buf, bytes, "BIAS_DATA_TYPE"); break;
  default: EMU_DIE("matmul desc attribute %d not emulated", (int)a);
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
  if (type != CUDA_R_32F && type != CUDA_R_16BF && type != CUDA_R_16F)
    EMU_DIE("cublasLtMatrixLayoutCreate: data type %d not emulated", (int)type);
  *l = new emu_layout{type, rows, cols, ld, 1, 0};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l,
                                                cublasLtMatrixLayoutAttribute_t a, const void *buf,
                                                size_t bytes) {
  switch (a) {
  case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: get(&l->batch, buf, bytes, "BATCH_COUNT"); break;
  case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET:
    get(&l->stride, buf, bytes, "STRIDED_BATCH_OFFSET");
    break;
  default: EMU_DIE("layout attribute %d not emulated", (int)a);
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
  *p = new emu_pref{{256, 256, 256, 256}, 0};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t a,
                                                    const void *buf, size_t bytes) {
  switch (a) {
  case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: get(&p->ws, buf, bytes, "MAX_WORKSPACE"); break;
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: get(&p->align[0], buf, bytes, "ALIGN_A"); break;
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: get(&p->align[1], buf, bytes, "ALIGN_B"); break;
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: get(&p->align[2], buf, bytes, "ALIGN_C"); break;
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: get(&p->align[3], buf, bytes, "ALIGN_D"); break;
  default: EMU_DIE("preference attribute %d not emulated", (int)a);
  }
  return CUBLAS_STATUS_SUCCESS;
}

/* cuBLASLt's bias vector and GeLU aux matrix are of D's type outside its fp8
 * and IMMA kernels (none here): their types must be left at the default (-1)
 * or set to D's. */
static cublasStatus_t check_epilogue_types(const emu_desc *op, cudaDataType_t dt) {
  if ((op->bias_type != -1 && op->bias_type != (int32_t)dt) ||
      (op->aux_type != -1 && op->aux_type != (int32_t)dt))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  return CUBLAS_STATUS_SUCCESS;
}

/* An epilogue's operands against what cuBLASLt documents for D of m×n rows
 * and columns of type dt: the bias a vector of m, the GeLU input (aux) a
 * matrix of its own with ld >= m and a multiple of 8, one matrix (its batch
 * stride is not emulated), both of type dt. Returns GELU_FWD or GELU_BWD for
 * the GeLU epilogues, else 0. */
static int check_epilogue(const char *what, const emu_desc *op, long m, long n, int batch,
                          cudaDataType_t dt) {
  size_t e = type_bytes(dt);
  int bias = 0, gelu = 0;
  switch (op->epilogue) {
  case CUBLASLT_EPILOGUE_DEFAULT: break;
  case CUBLASLT_EPILOGUE_BIAS: bias = 1; break;
  case CUBLASLT_EPILOGUE_GELU_AUX: gelu = GELU_FWD; break;
  case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: bias = 1, gelu = GELU_FWD; break;
  case CUBLASLT_EPILOGUE_DGELU: gelu = GELU_BWD; break;
  default: EMU_DIE("%s: epilogue %d not emulated", what, (int)op->epilogue);
  }
  if (bias && (!op->bias || !is_device(op->bias, m * e)))
    EMU_DIE("%s: bias epilogue without a bias of %ld elements of %zu bytes in device memory", what,
            m, e);
  if (!gelu) return 0;
  if (op->aux_ld < m || op->aux_ld % 8)
    EMU_DIE("%s: EPILOGUE_AUX_LD %ld: cuBLASLt wants a multiple of 8, at least the %ld rows of D",
            what, (long)op->aux_ld, m);
  if (batch != 1)
    EMU_DIE("%s: GeLU epilogue on %d matrices: aux batch stride not emulated", what, batch);
  if (!op->aux || !is_device(op->aux, ((size_t)(n - 1) * op->aux_ld + m) * e))
    EMU_DIE("%s: GeLU epilogue without an aux matrix (%ld x %ld, ld %ld, %zu-byte elements) in "
            "device memory",
            what, m, n, (long)op->aux_ld, e);
  return gelu;
}

/* The "algorithm" remembers the alignments it was chosen for, the bias's and
 * aux's as their pointers had them (cuBLASLt reads those pointers for it);
 * cublasLtMatmul checks the pointers it gets against them. */
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t op,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t *res, int *returned) {
  *returned = 0;
  mt_emu::heuristics++;
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  if (mt_emu::lt_disabled || getenv("MT_CUDA_EMU_NO_LT")) return CUBLAS_STATUS_NOT_SUPPORTED;
  cublasStatus_t st = check_types(op->compute, a->type, b->type, c->type, d->type);
  if (st == CUBLAS_STATUS_SUCCESS) st = check_epilogue_types(op, d->type);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  int gelu = check_epilogue("cublasLtMatmulAlgoGetHeuristic", op, (long)d->rows, (long)d->cols,
                            d->batch, d->type);
  memset(res, 0, sizeof *res);
  for (int i = 0; i < 4; i++) res->algo.data[i] = pref->align[i];
  res->algo.data[4] = 0x656d75; /* "emu": marks an algorithm from here */
  res->algo.data[5] = op->bias ? actual_alignment(op->bias) : 0;
  res->algo.data[6] = gelu ? actual_alignment(op->aux) : 0;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t op, const void *alpha,
                              const void *A, cublasLtMatrixLayout_t a, const void *B,
                              cublasLtMatrixLayout_t b, const void *beta, const void *C,
                              cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_bytes,
                              cudaStream_t s) {
  if (!algo || algo->data[4] != 0x656d75)
    EMU_DIE("cublasLtMatmul: no algorithm from the heuristic");
  if (ws_bytes && !is_device(ws, ws_bytes)) EMU_DIE("cublasLtMatmul: workspace not device memory");
  const void *ptr[4] = {A, B, C, D};
  for (int i = 0; i < 4; i++)
    if (actual_alignment(ptr[i]) < algo->data[i])
      EMU_DIE("cublasLtMatmul: operand %c at %p is %u-byte aligned, the heuristic was told %u",
              "ABCD"[i], ptr[i], actual_alignment(ptr[i]), (unsigned)algo -> data[i]);
  cublasStatus_t st = check_types(op->compute, a->type, b->type, c->type, d->type);
  if (st == CUBLAS_STATUS_SUCCESS) st = check_epilogue_types(op, d->type);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  int ta = op->ta == CUBLAS_OP_T, tb = op->tb == CUBLAS_OP_T;
  long m = (long)d->rows, n = (long)d->cols, k = (long)(ta ? a->rows : a->cols);
  /* cuBLASLt's own consistency rules: op(A) is m×k, op(B) k×n */
  if ((long)(ta ? a->cols : a->rows) != m || (long)(tb ? b->rows : b->cols) != n ||
      (long)(tb ? b->cols : b->rows) != k || c->rows != d->rows || c->cols != d->cols ||
      a->ld < (int64_t)a->rows || b->ld < (int64_t)b->rows || d->ld < (int64_t)d->rows)
    EMU_DIE("cublasLtMatmul: layouts A %lux%lu ld %ld%s, B %lux%lu ld %ld%s, D %lux%lu ld %ld do "
            "not fit together",
            (unsigned long)a->rows, (unsigned long)a->cols, (long)a->ld, ta ? " (T)" : "",
            (unsigned long)b->rows, (unsigned long)b->cols, (long)b->ld, tb ? " (T)" : "",
            (unsigned long)d->rows, (unsigned long)d->cols, (long)d->ld);
  if (a->batch != d->batch || b->batch != d->batch || c->batch != d->batch)
    EMU_DIE("cublasLtMatmul: batch counts differ");
  int gelu = check_epilogue("cublasLtMatmul", op, m, n, d->batch, d->type);
  int with_bias =
      op->epilogue == CUBLASLT_EPILOGUE_BIAS || op->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
  const void *eptr[2] = {with_bias ? op->bias : NULL, gelu ? op->aux : NULL};
  for (int i = 0; i < 2; i++)
    if (eptr[i] && actual_alignment(eptr[i]) < algo->data[5 + i])
      EMU_DIE("cublasLtMatmul: %s at %p is %u-byte aligned, the heuristic saw %u",
              i ? "aux" : "bias", eptr[i], actual_alignment(eptr[i]), (unsigned)algo->data[5 + i]);
  if (gelu == GELU_BWD) {
    /* cuBLASLt documents DGELU as "apply GELU gradient to matmul output",
     * not where beta · C joins it: only beta 0 has a meaning to emulate */
    if (*(const float *)beta != 0.0f)
      EMU_DIE("cublasLtMatmul: DGELU epilogue with beta %g: whether beta * C is added before or "
              "after the GeLU gradient is undocumented, not emulated",
              (double)*(const float *)beta);
    size_t e = type_bytes(d->type);
    const char *lo = (const char *)D, *hi = lo + ((size_t)(n - 1) * d->ld + m) * e;
    const char *alo = (const char *)op->aux, *ahi = alo + ((size_t)(n - 1) * op->aux_ld + m) * e;
    if (alo < hi && lo < ahi)
      EMU_DIE("cublasLtMatmul: DGELU epilogue whose aux matrix %p overlaps D %p", op->aux, D);
  }
  wait_idle(s, "cublasLtMatmul");
  gemm(op->compute, ta, tb, (int)m, (int)n, (int)k, *(const float *)alpha, A, a->type, a->ld,
       a->stride, B, b->type, b->ld, b->stride, *(const float *)beta, C, c->ld, c->stride, D, d->ld,
       d->stride, d->type, d->batch, with_bias ? op->bias : NULL, d->type, gelu,
       gelu ? op->aux : NULL, gelu ? (long)op->aux_ld : 0);
  /* GELU_AUX*: aux = the result with its bias, D = GeLU of that fp32 value;
   * DGELU: D = gelu'(aux) times the fp32 result; each rounded to D's type */
  if (gelu == GELU_FWD) mt_emu::gemms_lt_gelu++;
  if (gelu == GELU_BWD) mt_emu::gemms_lt_dgelu++;
  mt_emu::gemms_lt++;
  if (a->type != CUDA_R_32F) mt_emu::gemms_16bit++;
  return CUBLAS_STATUS_SUCCESS;
}
