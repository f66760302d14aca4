// Work sharing inside the decoder's step-long OpenMP region (detail::in_split_team): each thread
// starts on its own contiguous share of a kernel's items, as a static schedule would give it; a
// thread that runs out asks another for work, and that one hands over the back half of what it has
// not started yet.
//
// Why (a scratch timer around each call of a Qwen3-0.6B-shaped decode step, 2 threads): with the
// static split each thread waited 2-10 us at a layer kernel's closing barrier (calls of 50-100 us)
// and 30-220 us at the lm_head's (2.3 ms), in either order: one thread had started late, or read its
// half more slowly (in the host's fast-read periods one thread's loops ran 10-17 % longer than the
// other's). With this the waits are 0.5-1 us, the barrier itself. libgomp's dynamic schedule had
// balanced the threads but lost more than it saved (one shared counter bumped per item, and each
// thread's items interleaved with the other's, so neither read one long run of memory), and so did
// a first version of this file in which the owner claimed chunks of its own share with a
// compare-and-swap: the waits went, but the loops got longer by about as much, we think because a
// locked instruction waits for every load in flight, which stalls the weight stream at each claim.
// Here the thread doing the work only reads a word of its own between items; the locked
// instructions and the waiting are on the side of the thread that has nothing left to do.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

#include <omp.h>

namespace brecq {
namespace detail {

// Per thread: `request`, where others ask it for work: 0 or a word of an earlier call = nobody
// asks; (call << 8 | asker + 1) = that thread asks; (call << 8 | kClosed) = it has no work left in
// this call. `grant`, where the thread receives the answer to its own request: (call << 48 |
// begin << 24 | end), an empty range when there was nothing to give.
struct alignas(64) ShareSlot {
  std::atomic<uint64_t> request{0};
  char pad_[56];
  std::atomic<uint64_t> grant{0};
};

class TeamShares {
 public:
  explicit TeamShares(int threads) : size_(threads < 1 ? 1 : threads), slots_(new ShareSlot[size_]) {}
  // Before each region that uses it (its count of calls starts again at zero there).
  void reset() {
    for (int i = 0; i < size_; ++i) {
      slots_[i].request.store(0, std::memory_order_relaxed);
      slots_[i].grant.store(0, std::memory_order_relaxed);
    }
  }
  int size() const { return size_; }
  ShareSlot& slot(int thread) { return slots_[thread]; }

 private:
  int size_;
  std::unique_ptr<ShareSlot[]> slots_;
};

// The calling thread's team (null outside a region that set one; whoever sets it sees to it that
// the team is the region's whole team, of at most kMaxSharedTeam threads) and its count of shared
// calls so far in that region: every thread of the team makes the same calls in the same order, so
// the count names the call.
struct TeamMember {
  TeamShares* shares = nullptr;
  uint32_t calls = 0;
};
inline TeamMember& team_member() {
  static thread_local TeamMember member;
  return member;
}

// Inside a spin-wait: tells the core (and an SMT sibling) that this thread is only waiting.
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

constexpr int kShareBits = 24;
constexpr uint64_t kShareMask = (uint64_t{1} << kShareBits) - 1;
constexpr int64_t kMaxSharedItems = int64_t{1} << kShareBits;
constexpr uint64_t kClosed = 0xff;
constexpr int kMaxSharedTeam = 254;  // asker + 1 < kClosed

// body(i) for every i in [0, count), among the calling team, ending with the team's barrier. Every
// thread of the team must call it; count < kMaxSharedItems, team size <= kMaxSharedTeam.
template <class Body>
void for_each_index_shared(TeamShares& shares, int64_t count, const Body& body) {
  const int team = omp_get_num_threads(), me = omp_get_thread_num();
  const uint64_t call = team_member().calls++ % 0xffff + 1;  // 16 bits, never 0
  std::atomic<uint64_t>& my_request = shares.slot(me).request;
  std::atomic<uint64_t>& my_grant = shares.slot(me).grant;
  int64_t next = me * count / team, end = (me + 1) * count / team;
  auto answer = [&](uint64_t asker_word, int64_t give) {
    const int asker = static_cast<int>(asker_word & 0xff) - 1;
    const uint64_t from = static_cast<uint64_t>(end - give), to = static_cast<uint64_t>(end);
    shares.slot(asker).grant.store(call << 48 | from << kShareBits | to, std::memory_order_release);
    end -= give;
  };
  for (;;) {
    while (next < end) {
      // A plain load of a line nobody writes unless asking: no fence on the weight stream.
      const uint64_t asked = my_request.load(std::memory_order_acquire);
      if (asked >> 8 == call && (asked & 0xff) != kClosed) {
        answer(asked, (end - next) / 2);
        my_request.store(0, std::memory_order_release);
      }
      body(next++);
    }
    // Out of work: close for asking (anyone who asked meanwhile gets an empty answer), then ask the
    // others in turn until one gives something or all are out too.
    const uint64_t asked = my_request.exchange(call << 8 | kClosed, std::memory_order_acq_rel);
    if (asked >> 8 == call && (asked & 0xff) != kClosed) answer(asked, 0);
    bool got_work = false;
    for (int step = 1; step < team && !got_work; ++step) {
      std::atomic<uint64_t>& their_request = shares.slot((me + step) % team).request;
      for (;;) {
        uint64_t seen = their_request.load(std::memory_order_acquire);
        if (seen >> 8 == call) {
          if ((seen & 0xff) == kClosed) break;  // that one is out of work
          spin_pause();                          // another thread's request is being answered
          continue;
        }
        my_grant.store(0, std::memory_order_relaxed);
        if (!their_request.compare_exchange_strong(seen, call << 8 | static_cast<uint64_t>(me + 1),
                                                   std::memory_order_acq_rel))
          continue;
        uint64_t granted;
        while ((granted = my_grant.load(std::memory_order_acquire)) == 0) spin_pause();
        next = static_cast<int64_t>(granted >> kShareBits & kShareMask);
        end = static_cast<int64_t>(granted & kShareMask);
        if (next < end) {
          got_work = true;
          my_request.store(0, std::memory_order_release);  // open for asking again
        }
        break;
      }
    }
    if (!got_work) break;
  }
#pragma omp barrier
}

}  // namespace detail
}  // namespace brecq
