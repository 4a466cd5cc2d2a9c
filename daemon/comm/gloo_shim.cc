// gloo_shim.cc — the Gloo backend of the comm layer, and the only C++ in the
// daemon: an extern "C" table (mt__comm_gloo) over gloo's TCP transport.
//
// Bootstrap goes through our mt_store (StoreAdapter); all-reduce, all-gather,
// broadcast and barrier are gloo's options-style collectives with a timeout;
// reduce-scatter (which this gloo has only in the old bound-buffer style) and
// send/recv are rings of unbound buffers with timeouts. No C++ exception leaves
// this file: every entry point catches, and turns what went wrong into an
// MT_E* code and a message naming the peer when one is known.
//
// Failure handling: any failure (and mt_comm_abort) shuts every connection of
// the group down, so that nothing writes into the caller's buffers afterwards
// and every peer's operation fails at once instead of at its deadline. We do
// that through dups of the connections' sockets, found by their addresses
// (find_sockets): Debian's libgloo-dev lacks gloo/common/memory.h, so the TCP
// pair's header, and with it any private handle on a connection, is out of
// reach. A shut-down socket makes gloo's loop fail every operation waiting on
// it; our own waits (send/recv, reduce-scatter) are also woken directly.
//
// Deadlines: gloo's collectives apply the timeout to each wait inside the
// algorithm, so a stuck or dead peer fails them within the timeout of the
// moment progress stopped; our own waits share one deadline per operation.
// An abort wakes every wait, gloo's collectives' own among them (Waits): a
// shut-down connection alone leaves a wait on a message already half
// received asleep until its timeout.

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/pair.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

extern "C" {
#include "comm_impl.h"
#include "err.h"
}

namespace {

namespace tcp = gloo::transport::tcp;
using ms = std::chrono::milliseconds;
using clk = std::chrono::steady_clock;

// Slots of our own operations; gloo's collectives use prefixes 0x01-0x08 in
// the top byte (gloo/types.h).
constexpr uint64_t kSlotP2P = 0xA1ull << 56;
constexpr uint64_t kSlotReduceScatter = 0xA2ull << 56;
constexpr uint64_t kSlotReduce = 0xA3ull << 56;

// An error that already carries an MT_E* code and our message.
struct ShimError : std::runtime_error {
  int code;
  ShimError(int code, const std::string &msg) : std::runtime_error(msg), code(code) {}
};

// gloo prefixes its messages with "[file:line] "; drop that.
std::string strip_location(const std::string &msg) {
  std::string s = msg;
  while (!s.empty() && s[0] == '[') {
    size_t end = s.find("] ");
    if (end == std::string::npos) break;
    s = s.substr(end + 2);
  }
  return s;
}

std::string sockaddr_str(const sockaddr_storage &ss) {
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (ss.ss_family == AF_INET) {
    auto *in = reinterpret_cast<const sockaddr_in *>(&ss);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  if (ss.ss_family == AF_INET6) {
    auto *in6 = reinterpret_cast<const sockaddr_in6 *>(&ss);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    return "[" + std::string(host) + "]:" + std::to_string(port);
  }
  return "?";
}

// ------------------------------------------------------------------ store

// gloo's rendezvous over our mt_store, under "<prefix>/gloo/". Every wait
// ends at the deadline of the group's creation.
class StoreAdapter : public gloo::rendezvous::Store {
public:
  StoreAdapter(mt_store *store, const std::string &prefix, clk::time_point deadline)
      : store_(store), prefix_(prefix + "/gloo/"), deadline_(deadline) {}

  void set(const std::string &key, const std::vector<char> &data) override {
    std::string k = prefix_ + key;
    int rc = mt_store_set(store_, k.c_str(), data.data(), data.size());
    if (rc) throw ShimError(rc, mt_errmsg());
    written_.push_back(k);
  }

  // Once every rank's full mesh is connected (a barrier after it), every
  // peer has read what this rank wrote: each reads every rank's addresses
  // before its own mesh is done. (This rank's mesh alone is not enough: its
  // connection to a peer can complete before that peer has read its key.)
  // Deleted then, a group's addresses
  // (a key per rank, an address per peer: O(size^2) bytes) do not stay in
  // the coordinator's memory for the rest of the job, generation after
  // generation. A failure only leaves them there.
  void forget_written() {
    for (const auto &k : written_) mt_store_del(store_, k.c_str());
    written_.clear();
  }

  std::vector<char> get(const std::string &key) override {
    std::string k = prefix_ + key;
    void *value = nullptr;
    size_t bytes = 0;
    int rc = mt_store_get(store_, k.c_str(), &value, &bytes, left_ms());
    if (rc) throw ShimError(rc, mt_errmsg());
    std::vector<char> out(static_cast<char *>(value), static_cast<char *>(value) + bytes);
    free(value);
    return out;
  }

  void wait(const std::vector<std::string> &keys) override { wait(keys, ms(0)); }

  void wait(const std::vector<std::string> &keys, const ms &) override {
    for (const auto &key : keys) get(key);
  }

private:
  int left_ms() const {
    auto left = std::chrono::duration_cast<ms>(deadline_ - clk::now()).count();
    return left > 0 ? static_cast<int>(left) : 0;
  }

  mt_store *store_;
  std::string prefix_;
  clk::time_point deadline_;
  std::vector<std::string> written_;
};

// ------------------------------------------------------------------ waits

// Every unbound buffer of a group, gloo's own among them: its collectives
// make their buffers through the context (ContextOfWaits), so an abort can
// wake each wait. A failed connection wakes only the operations gloo has
// not begun to move; a wait on a message half received when it failed
// (a peer's abort shut the connection mid-transfer) slept to its deadline.
class Waits {
public:
  // Throws once woken for the abort: a buffer made after it would wait unwoken.
  void add(gloo::transport::UnboundBuffer *b) {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_) throw ShimError(MT_ECANCELED, "aborted");
    live_.push_back(b);
  }
  void remove(gloo::transport::UnboundBuffer *b) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find(live_.begin(), live_.end(), b);
    if (it != live_.end()) live_.erase(it);
  }
  // The group's abort: wakes every wait, and from now on none waits
  // (WaitedBuffer), as gloo's collectives go on past a woken wait to the next.
  void wake_all() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    for (auto *b : live_) {
      b->abortWaitRecv();
      b->abortWaitSend();
    }
  }

  bool aborted() const { return aborted_; }

private:
  std::mutex mu_; // a buffer leaves the list before it is freed, under it
  std::atomic<bool> aborted_{false};
  std::vector<gloo::transport::UnboundBuffer *> live_;
};

// A TCP unbound buffer in its group's Waits for its lifetime.
class WaitedBuffer final : public gloo::transport::UnboundBuffer {
public:
  WaitedBuffer(std::shared_ptr<Waits> waits, std::unique_ptr<gloo::transport::UnboundBuffer> in)
      : UnboundBuffer(in->ptr, in->size), waits_(std::move(waits)), in_(std::move(in)) {
    waits_->add(in_.get());
  }
  ~WaitedBuffer() override { waits_->remove(in_.get()); } // then in_ waits for gloo's loop
  WaitedBuffer(const WaitedBuffer &) = delete;
  WaitedBuffer &operator=(const WaitedBuffer &) = delete;

  // Past the abort a wait returns at once (aborted), and nothing is posted:
  // a wait the abort set out to wake is woken (abortWait*) or returns here
  bool waitRecv(int *rank, ms timeout) override {
    return !waits_->aborted() && in_->waitRecv(rank, timeout);
  }
  bool waitSend(int *rank, ms timeout) override {
    return !waits_->aborted() && in_->waitSend(rank, timeout);
  }
  void abortWaitRecv() override { in_->abortWaitRecv(); }
  void abortWaitSend() override { in_->abortWaitSend(); }
  void send(int dst, uint64_t slot, size_t offset, size_t nbytes) override {
    refuse_if_aborted();
    in_->send(dst, slot, offset, nbytes);
  }
  void recv(int src, uint64_t slot, size_t offset, size_t nbytes) override {
    refuse_if_aborted();
    in_->recv(src, slot, offset, nbytes);
  }
  void recv(std::vector<int> srcs, uint64_t slot, size_t offset, size_t nbytes) override {
    refuse_if_aborted();
    in_->recv(std::move(srcs), slot, offset, nbytes);
  }

private:
  void refuse_if_aborted() const {
    if (waits_->aborted()) throw ShimError(MT_ECANCELED, "aborted");
  }

  std::shared_ptr<Waits> waits_;
  std::unique_ptr<gloo::transport::UnboundBuffer> in_;
};

// The TCP context, with every buffer it makes a WaitedBuffer; pairs are
// the TCP context's own.
class ContextOfWaits final : public gloo::transport::Context {
public:
  ContextOfWaits(std::shared_ptr<gloo::transport::Context> in, std::shared_ptr<Waits> waits)
      : Context(in->rank, in->size), in_(std::move(in)), waits_(std::move(waits)) {
    setTimeout(in_->getTimeout());
  }
  std::unique_ptr<gloo::transport::Pair> &getPair(int rank) override { return in_->getPair(rank); }
  std::unique_ptr<gloo::transport::Pair> &createPair(int rank) override {
    return in_->createPair(rank);
  }
  std::unique_ptr<gloo::transport::UnboundBuffer> createUnboundBuffer(void *ptr,
                                                                      size_t size) override {
    return std::make_unique<WaitedBuffer>(waits_, in_->createUnboundBuffer(ptr, size));
  }

private:
  std::shared_ptr<gloo::transport::Context> in_;
  std::shared_ptr<Waits> waits_;
};

// ------------------------------------------------------------------ mesh

// gloo's full mesh (rendezvous::Context::connectFullMesh), with a key per
// pair. This gloo gives each pair a listening socket of its own, so a rank
// has size - 1 addresses to publish; connectFullMesh writes them all under
// one key and has every rank read every key, twice: 2 size^3 x 136 bytes
// through the coordinator's store, 24 TB for MT-NLG's 4480-rank world
// group. Here rank r writes the address meant for peer i under a/<i>/<r>
// and reads the ones meant for it: 2 size^2 x 136 bytes in all (5.5 GB
// there), the same number of reads as gloo's. The keys go once every rank
// is past its mesh (Group's barrier, StoreAdapter::forget_written).
class MeshContext : public gloo::Context {
public:
  MeshContext(int rank, int size) : gloo::Context(rank, size) {}

  // Per peer, where its pair for this rank listened: the remote address of
  // the connection when this rank was the side that connected.
  std::vector<sockaddr_storage> peer_listener;

  void connect_mesh(StoreAdapter &store, std::shared_ptr<gloo::transport::Device> &dev,
                    std::shared_ptr<Waits> waits) {
    auto tc = dev->createContext(rank, size);
    tc->setTimeout(getTimeout());
    const std::string me = std::to_string(rank);
    for (int i = 0; i < size; i++) {
      if (i == rank) continue;
      auto &pair = tc->createPair(i);
      store.set("a/" + std::to_string(i) + "/" + me, pair->address().bytes());
    }
    peer_listener.assign(size, sockaddr_storage{});
    for (int i = 0; i < size; i++) {
      if (i == rank) continue;
      auto addr = store.get("a/" + me + "/" + std::to_string(i));
      peer_listener[i] = tcp::Address(addr).getSockaddr();
      tc->getPair(i)->connect(addr);
    }
    device_ = dev;
    transportContext_ = std::make_shared<ContextOfWaits>(std::move(tc), std::move(waits));
  }
};

// ------------------------------------------------------------------ group

struct Group {
  int rank = 0, size = 1;
  std::shared_ptr<gloo::transport::Device> device;
  std::shared_ptr<MeshContext> context; // null when size == 1
  // Per peer rank (-1 for this rank): a dup of the connection's socket and the
  // peer's address. Through the dup we shut a connection down (gloo's loop
  // then wakes every wait on it; the peer sees the connection go) and see
  // whether the peer closed it, without gloo's private members.
  std::vector<int> sock;
  std::vector<std::string> peer;
  uint32_t seq = 0; // tag of the next collective; every rank counts alike
  std::atomic<bool> closed{false};
  // Every unbound buffer of the group while it lives, ours and gloo's
  std::shared_ptr<Waits> waits = std::make_shared<Waits>();
  // Started point-to-point requests by slot (sendrecv_start), null when free.
  std::unique_ptr<gloo::transport::UnboundBuffer> p2p[MT_COMM_P2P_MAX];
  bool p2p_is_send[MT_COMM_P2P_MAX] = {};

  ~Group() {
    // Requests never waited for: shut the connections first, so gloo does not
    // move bytes for a buffer being freed, then release them.
    bool pending = false;
    for (auto &b : p2p) pending = pending || b;
    if (pending) close_all();
    for (auto &b : p2p) b.reset();
    context.reset(); // gloo closes its sockets first: ours are the last references
    for (int fd : sock)
      if (fd >= 0) ::close(fd);
  }

  // Shuts every connection down. Idempotent; any thread.
  void close_all() {
    closed = true;
    for (int fd : sock)
      if (fd >= 0) shutdown(fd, SHUT_RDWR);
  }

  bool aborted() const { return waits->aborted(); }

  void abort() { // exit-ok: closes this group's sockets, not abort(3)
    waits->wake_all();
    close_all();
  }

  // "rank 2 (peer 127.0.0.1:4711) closed the connection; ..." for every peer
  // whose end of its connection is gone (before we close ours).
  std::string broken_peers() const {
    std::string out;
    for (int r = 0; r < size; r++) {
      if (sock[r] < 0) continue;
      struct pollfd p = {sock[r], POLLRDHUP, 0};
      if (poll(&p, 1, 0) <= 0 || !(p.revents & (POLLRDHUP | POLLHUP | POLLERR))) continue;
      int err = 0;
      socklen_t len = sizeof err;
      getsockopt(sock[r], SOL_SOCKET, SO_ERROR, &err, &len);
      if (!out.empty()) out += "; ";
      out += "rank " + std::to_string(r) + " (peer " + peer[r] + ") " +
             (err == ECONNRESET ? "reset the connection" : "closed the connection");
    }
    return out;
  }
};

bool same_sockaddr(const sockaddr_storage &a, const sockaddr_storage &b) {
  if (a.ss_family != b.ss_family) return false;
  if (a.ss_family == AF_INET) {
    auto *x = reinterpret_cast<const sockaddr_in *>(&a),
         *y = reinterpret_cast<const sockaddr_in *>(&b);
    return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
  }
  if (a.ss_family == AF_INET6) {
    auto *x = reinterpret_cast<const sockaddr_in6 *>(&a);
    auto *y = reinterpret_cast<const sockaddr_in6 *>(&b);
    return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, 16);
  }
  return false;
}

// Finds each connection's socket among this process's descriptors by its local
// address (a pair's address() once connected) and keeps a dup of it. A local
// address alone can name two sockets: an accepted one has its listener's
// port, which the kernel may also have given another pair's outgoing
// connection. So first the connections this rank made, by both ends (the
// remote is where the peer listened), then the accepted ones among the
// rest. (Matched by the local address alone, 798 of 8010 sockets at 90
// ranks went to the wrong peer, and a broken connection named the wrong
// rank.)
// An address as a map key: family, port and address bytes.
std::string addr_key(const sockaddr_storage &ss) {
  if (ss.ss_family == AF_INET) {
    auto *in = reinterpret_cast<const sockaddr_in *>(&ss);
    return std::string("4") + std::string(reinterpret_cast<const char *>(&in->sin_port), 2) +
           std::string(reinterpret_cast<const char *>(&in->sin_addr), 4);
  }
  if (ss.ss_family == AF_INET6) {
    auto *in6 = reinterpret_cast<const sockaddr_in6 *>(&ss);
    return std::string("6") + std::string(reinterpret_cast<const char *>(&in6->sin6_port), 2) +
           std::string(reinterpret_cast<const char *>(&in6->sin6_addr), 16);
  }
  return "?";
}

void find_sockets(Group *g) {
  std::vector<sockaddr_storage> self(g->size);
  for (int r = 0; r < g->size; r++) {
    if (r == g->rank) continue;
    auto *a = dynamic_cast<const tcp::Address *>(&g->context->getPair(r)->address());
    if (!a) throw ShimError(MT_EIO, "gloo: pair to rank " + std::to_string(r) + " is not TCP");
    self[r] = a->getSockaddr();
  }
  struct conn_fd {
    int fd;
    sockaddr_storage remote;
    bool taken;
  };
  // Other threads of the process open and close descriptors meanwhile (the
  // other ranks, their groups, gloo's per-pair listeners): a descriptor seen
  // in the listing may be closed, or another socket, by the time it is
  // kept. So the kept dup is checked again, and the listing made anew for
  // the connections still missing.
  auto keep = [&](int r, conn_fd &c) {
    int fd = fcntl(c.fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0 && errno == EBADF) return false;
    if (fd < 0) {
      int err = errno;
      struct rlimit rl = {};
      getrlimit(RLIMIT_NOFILE, &rl);
      throw ShimError(MT_EIO, "gloo: keeping the socket of the connection to rank " +
                                  std::to_string(r) + ": " + strerror(err) +
                                  " (open files: limit " + std::to_string(rl.rlim_cur) +
                                  "; a group holds 2 per peer per rank)");
    }
    sockaddr_storage local, remote;
    socklen_t llen = sizeof local, rlen = sizeof remote;
    if (getsockname(fd, reinterpret_cast<sockaddr *>(&local), &llen) < 0 ||
        getpeername(fd, reinterpret_cast<sockaddr *>(&remote), &rlen) < 0 ||
        !same_sockaddr(local, self[r]) || !same_sockaddr(remote, c.remote)) {
      close(fd);
      return false;
    }
    c.taken = true;
    g->sock[r] = fd;
    g->peer[r] = sockaddr_str(remote);
    return true;
  };
  const auto &listened = g->context->peer_listener;
  for (int attempt = 0; attempt < 20; attempt++) {
    std::unordered_map<std::string, std::vector<conn_fd>> by_local; // connected sockets
    DIR *dir = opendir("/proc/self/fd");
    if (!dir)
      throw ShimError(MT_EIO, std::string("gloo: opendir /proc/self/fd: ") + strerror(errno));
    while (struct dirent *e = readdir(dir)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      int fd = atoi(e->d_name);
      sockaddr_storage local, remote;
      socklen_t llen = sizeof local, rlen = sizeof remote;
      if (getsockname(fd, reinterpret_cast<sockaddr *>(&local), &llen) < 0) continue;
      if (getpeername(fd, reinterpret_cast<sockaddr *>(&remote), &rlen) < 0) continue;
      by_local[addr_key(local)].push_back({fd, remote, false});
    }
    closedir(dir);
    int missing = 0;
    for (int pass = 0; pass < 2; pass++)
      for (int r = 0; r < g->size; r++) {
        if (r == g->rank || g->sock[r] >= 0) continue;
        auto it = by_local.find(addr_key(self[r]));
        if (it != by_local.end())
          for (auto &c : it->second)
            if (!c.taken && (pass == 1 || same_sockaddr(c.remote, listened[r])) && keep(r, c))
              break;
        if (pass == 1 && g->sock[r] < 0) missing++;
      }
    if (!missing) return;
  }
  for (int r = 0; r < g->size; r++)
    if (r != g->rank && g->sock[r] < 0)
      throw ShimError(MT_EIO, "gloo: no socket found for the connection to rank " +
                                  std::to_string(r) +
                                  " (gone already: did that rank leave as the group formed?)");
}

ms left_until(clk::time_point deadline) {
  return ms(std::max<ms::rep>(1, std::chrono::duration_cast<ms>(deadline - clk::now()).count()));
}

// Waits for a posted recv/send until deadline; false from gloo means aborted.
void wait_recv(gloo::transport::UnboundBuffer *b, clk::time_point deadline) {
  if (!b->waitRecv(nullptr, left_until(deadline))) throw ShimError(MT_ECANCELED, "aborted");
}

void wait_send(gloo::transport::UnboundBuffer *b, clk::time_point deadline) {
  if (!b->waitSend(nullptr, left_until(deadline))) throw ShimError(MT_ECANCELED, "aborted");
}

// Turns the exception of a failed operation into a code and a message naming
// the peers whose connections broke, then closes the group.
int fail(Group *g, int timeout_ms) {
  int code = MT_EIO;
  std::string msg;
  try {
    throw;
  } catch (const ShimError &e) {
    code = e.code;
    msg = e.what();
  } catch (const std::bad_alloc &) {
    code = MT_ENOMEM;
    msg = "out of memory";
  } catch (const std::exception &e) {
    msg = strip_location(e.what());
    if (msg.find("Timed out") != std::string::npos || msg.find("timeout") != std::string::npos) {
      code = MT_ETIMEDOUT;
      msg = "timed out after " + std::to_string(timeout_ms) + " ms";
    }
  } catch (...) {
    msg = "unknown C++ exception";
  }
  std::string peers = g->broken_peers();
  g->close_all();
  if (g->aborted()) return mt_seterr(MT_ECANCELED, "aborted");
  if (!peers.empty()) msg = code == MT_ETIMEDOUT ? msg + "; " + peers : peers;
  return mt_seterr(code, "%s", msg.c_str());
}

// An element type of the right size for gloo's templated setters.
template <size_t N> struct Bytes;
template <> struct Bytes<1> { using T = uint8_t; };
template <> struct Bytes<2> { using T = uint16_t; };
template <> struct Bytes<4> { using T = uint32_t; };
template <> struct Bytes<8> { using T = uint64_t; };

template <typename T>
void run_allreduce(Group *g, const void *send, void *recv, size_t count, mt__reduce_fn fn,
                   int timeout_ms) {
  gloo::AllreduceOptions opts(g->context);
  if (send != recv) opts.setInput(static_cast<T *>(const_cast<void *>(send)), count);
  opts.setOutput(static_cast<T *>(recv), count);
  opts.setReduceFunction([fn](void *o, const void *a, const void *b, size_t n) { fn(o, a, b, n); });
  opts.setTag(g->seq++);
  opts.setTimeout(ms(timeout_ms));
  gloo::allreduce(opts);
}

// Ring reduce-scatter: at step s rank r sends its partial sum of chunk
// r-s-1 to r+1 and adds chunk r-s-2 from r-1 into its own; after size-1
// steps chunk r is complete. Two scratch chunks alternate, so a chunk is
// received while the previous one is still being sent.
void run_reduce_scatter(Group *g, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                        mt_comm_op op, int timeout_ms) {
  const int n = g->size, r = g->rank;
  const size_t esz = mt_comm_dtype_size(dt), chunk = count * esz;
  const int left = (r + n - 1) % n, right = (r + 1) % n;
  const uint64_t slot = kSlotReduceScatter | g->seq++;
  mt__reduce_fn fn = mt__comm_reduce_fn(dt, op);
  const char *in = static_cast<const char *>(send);
  auto deadline = clk::now() + ms(timeout_ms);

  std::unique_ptr<char[]> scratch(new char[2 * chunk]);
  auto in_buf = g->context->createUnboundBuffer(const_cast<char *>(in), chunk * n);
  std::unique_ptr<gloo::transport::UnboundBuffer> tmp[2] = {
      g->context->createUnboundBuffer(scratch.get(), chunk),
      g->context->createUnboundBuffer(scratch.get() + chunk, chunk)};

  for (int s = 0; s < n - 1; s++) {
    const int send_idx = (r - s - 1 + 2 * n) % n, recv_idx = (r - s - 2 + 2 * n) % n;
    gloo::transport::UnboundBuffer *rb = tmp[s & 1].get();
    gloo::transport::UnboundBuffer *sb = s == 0 ? in_buf.get() : tmp[(s - 1) & 1].get();
    rb->recv(left, slot, 0, chunk);
    sb->send(right, slot, s == 0 ? send_idx * chunk : 0, chunk);
    wait_recv(rb, deadline);
    const char *mine = in + recv_idx * chunk;
    if (s == n - 2)
      fn(recv, rb->ptr, mine, count); // recv_idx == r
    else
      fn(rb->ptr, rb->ptr, mine, count);
    wait_send(sb, deadline);
  }
}

// Chain reduce to root, in segments: the rank after root starts, sending
// its segments to the rank before it, which adds its own and passes them on,
// until root adds its own into recv. Each rank sends count elements once
// (as in a reduce-scatter's ring), and a segment is received while the one
// before it is reduced and sent on.
void run_reduce(Group *g, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                mt_comm_op op, int root, int timeout_ms) {
  const int n = g->size, r = g->rank, pos = (r - root + n) % n;
  const int from = (r + 1) % n, to = (r - 1 + n) % n; // positions pos + 1 and pos - 1
  const size_t esz = mt_comm_dtype_size(dt), total = count * esz;
  const size_t seg = std::min<size_t>(total, (size_t(1) << 20) / esz * esz);
  const size_t nseg = (total + seg - 1) / seg;
  const uint64_t slot = kSlotReduce | g->seq++;
  mt__reduce_fn fn = mt__comm_reduce_fn(dt, op);
  const char *in = static_cast<const char *>(send);
  auto deadline = clk::now() + ms(timeout_ms);
  auto len = [&](size_t k) { return std::min(seg, total - k * seg); };

  if (pos == n - 1) { // the chain's head: its own segments, as they are
    auto b = g->context->createUnboundBuffer(const_cast<char *>(in), total);
    for (size_t k = 0; k < nseg; k++) {
      b->send(to, slot, k * seg, len(k));
      wait_send(b.get(), deadline);
    }
    return;
  }
  std::unique_ptr<char[]> scratch(new char[2 * seg]);
  std::unique_ptr<gloo::transport::UnboundBuffer> tmp[2] = {
      g->context->createUnboundBuffer(scratch.get(), seg),
      g->context->createUnboundBuffer(scratch.get() + seg, seg)};
  bool sending[2] = {false, false};
  tmp[0]->recv(from, slot, 0, len(0));
  for (size_t k = 0; k < nseg; k++) {
    gloo::transport::UnboundBuffer *b = tmp[k & 1].get(), *next = tmp[(k + 1) & 1].get();
    wait_recv(b, deadline);
    if (k + 1 < nseg) { // receive the next segment while this one is reduced
      if (sending[(k + 1) & 1]) wait_send(next, deadline), sending[(k + 1) & 1] = false;
      next->recv(from, slot, 0, len(k + 1));
    }
    const char *mine = in + k * seg;
    size_t elems = len(k) / esz;
    if (pos == 0) {
      fn(static_cast<char *>(recv) + k * seg, b->ptr, mine, elems);
    } else {
      fn(b->ptr, b->ptr, mine, elems);
      b->send(to, slot, 0, len(k));
      sending[k & 1] = true;
    }
  }
  for (int i = 0; i < 2; i++)
    if (sending[i]) wait_send(tmp[i].get(), deadline);
}

Group *create_group(const mt_comm_opts *o, int timeout_ms) {
  auto g = std::make_unique<Group>();
  g->rank = o->rank;
  g->size = o->size;
  g->sock.assign(o->size, -1);
  g->peer.assign(o->size, "");
  if (o->size == 1) return g.release();
  auto deadline = clk::now() + ms(timeout_ms);
  tcp::attr attr(o->addr && *o->addr ? o->addr : "127.0.0.1");
  g->device = tcp::CreateDevice(attr);
  g->context = std::make_shared<MeshContext>(o->rank, o->size);
  // A pair waits 5 x the context timeout for its connection; keep that
  // within our deadline. Operations pass their own timeouts.
  g->context->setTimeout(ms(std::max(1, timeout_ms / 5)));
  StoreAdapter store(o->store, o->prefix, deadline);
  g->context->connect_mesh(store, g->device, g->waits);
  {
    // a rank past its mesh has read every rank's addresses; once all are
    // past it (a barrier) none reads this rank's again
    gloo::BarrierOptions opts(g->context);
    opts.setTag(g->seq++);
    auto left = std::chrono::duration_cast<ms>(deadline - clk::now()).count();
    opts.setTimeout(ms(std::max<long long>(1, left)));
    gloo::barrier(opts);
  }
  store.forget_written();
  g->context->setTimeout(ms(timeout_ms));
  find_sockets(g.get());
  return g.release();
}

// gloo writes with writev(2): a peer that died would kill this process with
// SIGPIPE. Ignore it, unless the program installed a handler of its own.
void ignore_sigpipe() {
  struct sigaction sa;
  if (sigaction(SIGPIPE, nullptr, &sa) == 0 && sa.sa_handler == SIG_DFL &&
      !(sa.sa_flags & SA_SIGINFO)) {
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, nullptr);
  }
}

// ------------------------------------------------------------------ C face

int gloo_create(const mt_comm_opts *o, int timeout_ms, void **impl) {
  ignore_sigpipe();
  try {
    *impl = create_group(o, timeout_ms);
    return 0;
  } catch (const ShimError &e) {
    return mt_seterr(e.code, "%s", e.what());
  } catch (const std::bad_alloc &) {
    return mt_seterr(MT_ENOMEM, "gloo: out of memory");
  } catch (const std::exception &e) {
    std::string msg = strip_location(e.what());
    int code = msg.find("imeout") != std::string::npos ? MT_ETIMEDOUT : MT_EIO;
    return mt_seterr(code, "gloo: %s", msg.c_str());
  } catch (...) {
    return mt_seterr(MT_EIO, "gloo: unknown C++ exception");
  }
}

void gloo_destroy(void *impl) {
  try {
    delete static_cast<Group *>(impl);
  } catch (...) {
  }
}

void gloo_abort(void *impl) {
  try {
    static_cast<Group *>(impl)->abort(); // exit-ok: the group's abort
  } catch (...) {
  }
}

// Runs body for a group of size > 1: aborted or closed groups fail at once,
// exceptions become codes.
template <typename F> int guarded(void *impl, int timeout_ms, F body) {
  Group *g = static_cast<Group *>(impl);
  if (g->aborted()) return mt_seterr(MT_ECANCELED, "aborted");
  try {
    if (g->closed) throw ShimError(MT_EIO, "the group's connections are closed");
    body(g);
    // a wait the abort woke lets gloo's collectives run on to their end
    // over what had arrived: not a result
    if (g->aborted()) throw ShimError(MT_ECANCELED, "aborted");
    return 0;
  } catch (...) {
    return fail(g, timeout_ms);
  }
}

int gloo_allreduce(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                   mt_comm_op op, int timeout_ms) {
  Group *g = static_cast<Group *>(impl);
  const size_t esz = mt_comm_dtype_size(dt);
  if (g->size == 1) {
    if (send != recv) memmove(recv, send, count * esz);
    return 0;
  }
  mt__reduce_fn fn = mt__comm_reduce_fn(dt, op);
  return guarded(impl, timeout_ms, [&](Group *g) {
    switch (esz) {
    case 1: run_allreduce<Bytes<1>::T>(g, send, recv, count, fn, timeout_ms); break;
    case 2: run_allreduce<Bytes<2>::T>(g, send, recv, count, fn, timeout_ms); break;
    case 4: run_allreduce<Bytes<4>::T>(g, send, recv, count, fn, timeout_ms); break;
    default: run_allreduce<Bytes<8>::T>(g, send, recv, count, fn, timeout_ms); break;
    }
  });
}

int gloo_reduce_scatter(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                        mt_comm_op op, int timeout_ms) {
  Group *g = static_cast<Group *>(impl);
  if (g->size == 1) {
    if (send != recv) memmove(recv, send, count * mt_comm_dtype_size(dt));
    return 0;
  }
  return guarded(impl, timeout_ms,
                 [&](Group *g) { run_reduce_scatter(g, send, recv, count, dt, op, timeout_ms); });
}

int gloo_allgather(void *impl, const void *send, void *recv, size_t bytes, int timeout_ms) {
  Group *g = static_cast<Group *>(impl);
  char *out = static_cast<char *>(recv);
  if (g->size == 1) {
    if (send != recv) memmove(recv, send, bytes);
    return 0;
  }
  return guarded(impl, timeout_ms, [&](Group *g) {
    gloo::AllgatherOptions opts(g->context);
    if (send != out + g->rank * bytes)
      opts.setInput(static_cast<uint8_t *>(const_cast<void *>(send)), bytes);
    opts.setOutput(reinterpret_cast<uint8_t *>(out), bytes * g->size);
    opts.setTag(g->seq++);
    opts.setTimeout(ms(timeout_ms));
    gloo::allgather(opts);
  });
}

int gloo_broadcast(void *impl, void *buf, size_t bytes, int root, int timeout_ms) {
  Group *g = static_cast<Group *>(impl);
  if (g->size == 1) return 0;
  return guarded(impl, timeout_ms, [&](Group *g) {
    gloo::BroadcastOptions opts(g->context);
    opts.setOutput(static_cast<uint8_t *>(buf), bytes);
    opts.setRoot(root);
    opts.setTag(g->seq++);
    opts.setTimeout(ms(timeout_ms));
    gloo::broadcast(opts);
  });
}

int gloo_reduce(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                mt_comm_op op, int root, int timeout_ms) {
  Group *g = static_cast<Group *>(impl);
  if (g->size == 1) {
    if (send != recv) memmove(recv, send, count * mt_comm_dtype_size(dt));
    return 0;
  }
  return guarded(impl, timeout_ms,
                 [&](Group *g) { run_reduce(g, send, recv, count, dt, op, root, timeout_ms); });
}

int gloo_send(void *impl, const void *buf, size_t bytes, int peer, int timeout_ms) {
  return guarded(impl, timeout_ms, [&](Group *g) {
    auto deadline = clk::now() + ms(timeout_ms);
    auto b = g->context->createUnboundBuffer(const_cast<void *>(buf), bytes);
    b->send(peer, kSlotP2P);
    wait_send(b.get(), deadline);
  });
}

int gloo_recv(void *impl, void *buf, size_t bytes, int peer, int timeout_ms) {
  return guarded(impl, timeout_ms, [&](Group *g) {
    auto deadline = clk::now() + ms(timeout_ms);
    auto b = g->context->createUnboundBuffer(buf, bytes);
    b->recv(peer, kSlotP2P);
    wait_recv(b.get(), deadline);
  });
}

int gloo_sendrecv(void *impl, const void *send, size_t send_bytes, int dst, void *recv,
                  size_t recv_bytes, int src, int timeout_ms) {
  return guarded(impl, timeout_ms, [&](Group *g) {
    auto deadline = clk::now() + ms(timeout_ms);
    std::unique_ptr<gloo::transport::UnboundBuffer> sb, rb;
    if (recv_bytes) {
      rb = g->context->createUnboundBuffer(recv, recv_bytes);
      rb->recv(src, kSlotP2P);
    }
    if (send_bytes) {
      sb = g->context->createUnboundBuffer(const_cast<void *>(send), send_bytes);
      sb->send(dst, kSlotP2P);
    }
    if (rb) wait_recv(rb.get(), deadline);
    if (sb) wait_send(sb.get(), deadline);
  });
}

// Posts the send and the receive on unbound buffers kept in the request
// slots; gloo's loop thread moves them while the caller goes on.
int gloo_sendrecv_start(void *impl, int send_slot, const void *send, size_t send_bytes, int dst,
                        int recv_slot, void *recv, size_t recv_bytes, int src, int timeout_ms) {
  Group *group = static_cast<Group *>(impl);
  int rc = guarded(impl, timeout_ms, [&](Group *g) {
    // The buffer is in its slot before anything can throw, so the failure
    // path below frees it.
    auto post = [&](int slot, bool is_send, void *buf, size_t bytes, int peer) {
      g->p2p[slot] = g->context->createUnboundBuffer(buf, bytes);
      g->p2p_is_send[slot] = is_send;
      gloo::transport::UnboundBuffer *b = g->p2p[slot].get();
      if (is_send)
        b->send(peer, kSlotP2P);
      else
        b->recv(peer, kSlotP2P);
    };
    // receive first, as sendrecv does: the peer's send finds it posted
    if (recv_slot >= 0) post(recv_slot, false, recv, recv_bytes, src);
    if (send_slot >= 0) post(send_slot, true, const_cast<void *>(send), send_bytes, dst);
  });
  if (rc) // the connections are shut (fail): release what was posted
    for (int slot : {send_slot, recv_slot})
      if (slot >= 0) group->p2p[slot].reset();
  return rc;
}

int gloo_p2p_wait(void *impl, int slot, int timeout_ms) {
  Group *g = static_cast<Group *>(impl);
  std::unique_ptr<gloo::transport::UnboundBuffer> b = std::move(g->p2p[slot]);
  if (!b) return mt_seterr(MT_EINVAL, "no request in slot %d", slot);
  int rc = guarded(impl, timeout_ms, [&](Group *g) {
    auto deadline = clk::now() + ms(timeout_ms);
    if (g->p2p_is_send[slot])
      wait_send(b.get(), deadline);
    else
      wait_recv(b.get(), deadline);
  });
  // a failure shut the connections (fail), so nothing moves into b any more
  return rc;
}

int gloo_barrier(void *impl, int timeout_ms) {
  Group *g = static_cast<Group *>(impl);
  if (g->size == 1) return 0;
  return guarded(impl, timeout_ms, [&](Group *g) {
    gloo::BarrierOptions opts(g->context);
    opts.setTag(g->seq++);
    opts.setTimeout(ms(timeout_ms));
    gloo::barrier(opts);
  });
}

} // namespace

// reduce_start and wait: none; comm.c runs reduce at once (host memory).
extern "C" const mt__comm_backend mt__comm_gloo = {
    "gloo",         gloo_create,    gloo_destroy,
    gloo_abort,     gloo_allreduce, gloo_reduce_scatter,
    gloo_allgather, gloo_broadcast, gloo_reduce,
    nullptr,        nullptr,        gloo_send,
    gloo_recv,      gloo_sendrecv,  gloo_sendrecv_start,
    gloo_p2p_wait,  gloo_barrier,
};
