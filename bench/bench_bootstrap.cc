// bench_bootstrap — forming one Gloo group of N rank threads through a store:
// the comm layer's bootstrap (mt_comm_create: a counted join, then a key per
// pair) beside gloo's own rendezvous::Context::connectFullMesh over the same
// store in the same run (the peer). Prints, per N: wall time, store reads and
// the bytes they moved, and the ratios. Never fails on time.
//
// usage: bench_bootstrap [N...]     (default 16 32 64 128)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

extern "C" {
#include "comm.h"
#include "err.h"
#include "store.h"
}

namespace {

// The store both runs share: an in-memory mt_store, its reads counted.
struct Counted {
  mt_store base;
  mt_store *inner;
  std::mutex mu;
  long long reads = 0, read_bytes = 0;
};

Counted *of(mt_store *s) { return reinterpret_cast<Counted *>(s); }

int c_set(mt_store *s, const char *k, const void *v, size_t n) {
  return mt_store_set(of(s)->inner, k, v, n);
}
int c_get(mt_store *s, const char *k, void **v, size_t *n, int t) {
  size_t got = 0;
  int rc = mt_store_get(of(s)->inner, k, v, &got, t);
  if (n) *n = got;
  if (!rc) {
    std::lock_guard<std::mutex> lock(of(s)->mu);
    of(s)->reads++, of(s)->read_bytes += (long long)got;
  }
  return rc;
}
int c_add(mt_store *s, const char *k, int64_t d, int64_t *r) {
  return mt_store_add(of(s)->inner, k, d, r);
}
int c_check(mt_store *s, const char *k) { return mt_store_check(of(s)->inner, k); }
int c_del(mt_store *s, const char *k) { return mt_store_del(of(s)->inner, k); }
void c_free(mt_store *) {}

// gloo's rendezvous over the same store, as gloo expects one: wait() reads
// each key (the comm layer's own adapter does the same).
class GlooStore : public gloo::rendezvous::Store {
public:
  GlooStore(mt_store *s, std::string prefix) : s_(s), prefix_(std::move(prefix)) {}
  void set(const std::string &key, const std::vector<char> &data) override {
    mt_store_set(s_, (prefix_ + key).c_str(), data.data(), data.size());
  }
  std::vector<char> get(const std::string &key) override {
    void *v = nullptr;
    size_t n = 0;
    if (mt_store_get(s_, (prefix_ + key).c_str(), &v, &n, 120000))
      throw std::runtime_error(mt_errmsg());
    std::vector<char> out(static_cast<char *>(v), static_cast<char *>(v) + n);
    free(v);
    return out;
  }
  void wait(const std::vector<std::string> &keys) override {
    for (const auto &k : keys) get(k);
  }
  void wait(const std::vector<std::string> &keys, const std::chrono::milliseconds &) override {
    wait(keys);
  }

private:
  mt_store *s_;
  std::string prefix_;
};

struct Result {
  double seconds;
  long long reads, bytes;
  int failed;
};

Result run(Counted *st, int n, bool stock) {
  st->reads = st->read_bytes = 0;
  static int round = 0;
  std::string prefix = "bench/" + std::to_string(round++);
  std::vector<std::thread> th;
  std::vector<int> rc(n, 0);
  std::vector<mt_comm *> comms(n, nullptr);
  std::vector<std::shared_ptr<gloo::rendezvous::Context>> ctxs(n);
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < n; r++)
    th.emplace_back([&, r] {
      if (stock) {
        try {
          gloo::transport::tcp::attr attr("127.0.0.1");
          auto dev = gloo::transport::tcp::CreateDevice(attr);
          ctxs[r] = std::make_shared<gloo::rendezvous::Context>(r, n);
          ctxs[r]->setTimeout(std::chrono::milliseconds(120000));
          GlooStore gs(&st->base, prefix + "/");
          ctxs[r]->connectFullMesh(gs, dev);
        } catch (const std::exception &e) {
          fprintf(stderr, "gloo rank %d: %s\n", r, e.what());
          rc[r] = 1;
        }
        return;
      }
      mt_comm_opts o = {};
      o.store = &st->base, o.name = "bench", o.prefix = prefix.c_str(), o.rank = r, o.size = n;
      o.timeout_ms = 120000, o.backend = MT_COMM_GLOO;
      rc[r] = mt_comm_create(&comms[r], &o);
      if (rc[r]) fprintf(stderr, "comm rank %d: %s\n", r, mt_errmsg());
    });
  for (auto &t : th) t.join();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto *c : comms)
    if (c) mt_comm_destroy(c);
  ctxs.clear();
  int failed = 0;
  for (int x : rc) failed += x != 0;
  return {s, st->reads, st->read_bytes, failed};
}

} // namespace

int main(int argc, char **argv) {
  std::vector<int> sizes;
  for (int i = 1; i < argc; i++) sizes.push_back(atoi(argv[i]));
  if (sizes.empty()) sizes = {16, 32, 64, 128};
  Counted st;
  st.base = mt_store{c_set, c_get, c_add, c_check, c_del, c_free, "counted", nullptr, nullptr};
  if (mt_store_mem_new(&st.inner)) {
    fprintf(stderr, "bench_bootstrap: %s\n", mt_errmsg());
    return 1;
  }
  printf("one Gloo group of N rank threads formed through an in-memory store (reads counted)\n");
  printf("%5s | %-27s | %-27s | %7s %9s %9s\n", "N", "mt_comm_create: s, reads, MB",
         "gloo connectFullMesh (peer)", "time", "reads", "bytes");
  for (int n : sizes) {
    Result a = run(&st, n, false), b = run(&st, n, true);
    printf("%5d | %7.3f %8lld %10.3f | %7.3f %8lld %10.3f | %6.2fx %8.2fx %8.1fx%s\n", n, a.seconds,
           a.reads, a.bytes / 1e6, b.seconds, b.reads, b.bytes / 1e6, b.seconds / a.seconds,
           (double)b.reads / a.reads, (double)b.bytes / a.bytes,
           a.failed || b.failed ? "  (some ranks failed)" : "");
    fflush(stdout);
  }
  printf("ratios: the peer's over the comm layer's (higher: the comm layer costs less)\n");
  mt_store_free(st.inner);
  return 0;
}
