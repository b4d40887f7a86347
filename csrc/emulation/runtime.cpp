// The fiber scheduler behind csrc/emulation/cuda_emu.h (see its header comment).
// No torch headers: this TU stays cheap to compile.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "emulation/cuda_emu.h"

namespace emu {

thread_local ThreadState* g_cur = nullptr;
thread_local dim3 g_block_dim;
thread_local dim3 g_grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class St { Ready, WaitBlock, WaitWarp, WaitGrid, Done };

struct Fiber {
  ucontext_t ctx;
  ThreadState ts;
  St state = St::Ready;
  int block = 0;   // index into Group::blocks
  int warp = 0;    // global warp index within the group
  unsigned lane = 0;
  unsigned wmask = 0;  // mask of the pending warp collective
  uint64_t wval = 0;   // this lane's deposit
  uint64_t snap[32];   // the warp's deposits, copied at release
  char* stack = nullptr;
};

struct BlockState {
  int live = 0;     // fibers not Done
  int arrived = 0;  // fibers waiting at __syncthreads
  int nthreads = 0;
  std::vector<unsigned char> smem;
};

struct Group {
  std::vector<Fiber*> fibers;
  std::vector<BlockState> blocks;
  std::vector<std::vector<Fiber*>> warps;  // lanes of each warp (index = lane)
  int live = 0, grid_arrived = 0;
  bool cooperative = false;
  const std::function<void()>* body = nullptr;
  ucontext_t sched;
  Fiber* current = nullptr;
  std::string error;
};

thread_local Group* g_group = nullptr;
thread_local int g_mode = -1;
thread_local unsigned g_seed = 12345;
thread_local std::vector<std::unique_ptr<Fiber>> g_pool;  // fibers and their stacks, reused

void init_schedule_from_env() {
  if (g_mode >= 0) return;
  g_mode = 0;
  const char* s = std::getenv("FUSEDRNN_EMU_SCHEDULE");
  if (!s) return;
  std::string v(s);
  auto colon = v.find(':');
  if (colon != std::string::npos) {
    g_seed = static_cast<unsigned>(std::strtoul(v.c_str() + colon + 1, nullptr, 10));
    v = v.substr(0, colon);
  }
  if (v == "reverse") g_mode = 1;
  else if (v == "forward") g_mode = 2;
  else if (v == "random") g_mode = 3;
}

Fiber* get_fiber(size_t i) {
  while (g_pool.size() <= i) {
    auto f = std::make_unique<Fiber>();
    f->stack = static_cast<char*>(std::malloc(kStackBytes));
    if (!f->stack) throw std::runtime_error("emulator: out of memory for fiber stacks");
    g_pool.push_back(std::move(f));
  }
  return g_pool[i].get();
}

void switch_to_scheduler() {
  Group* g = g_group;
  Fiber* f = g->current;
  swapcontext(&f->ctx, &g->sched);
  g_cur = &g->current->ts;  // resumed: restore this fiber's CUDA state
}

void block_barrier_check(Group* g, BlockState& b, int block) {
  if (b.arrived > 0 && b.arrived == b.live) {
    if (b.live != b.nthreads) {  // CUDA requires every thread of the block to reach it
      g->error = "deadlock: __syncthreads reached by only some threads of a block (the others exited)";
      return;
    }
    b.arrived = 0;
    for (Fiber* f : g->fibers)
      if (f->block == block && f->state == St::WaitBlock) f->state = St::Ready;
  }
}

void grid_barrier_check(Group* g) {
  if (g->grid_arrived > 0 && g->grid_arrived == g->live) {
    g->grid_arrived = 0;
    for (Fiber* f : g->fibers)
      if (f->state == St::WaitGrid) f->state = St::Ready;
  }
}

// Release a warp collective once every lane of the mask has arrived with the same mask.
void warp_check(Group* g, int warp) {
  auto& lanes = g->warps[warp];
  unsigned mask = 0;
  for (Fiber* w : lanes) {  // the first pending mask whose lanes have all arrived
    if (!w || w->state != St::WaitWarp) continue;
    unsigned arrived = 0;
    for (Fiber* f : lanes)
      if (f && f->state == St::WaitWarp && f->wmask == w->wmask) arrived |= 1u << f->lane;
    if ((arrived & w->wmask) == w->wmask) { mask = w->wmask; break; }
  }
  if (!mask) return;
  uint64_t vals[32] = {0};
  for (Fiber* f : lanes)
    if (f && ((mask >> f->lane) & 1u)) vals[f->lane] = f->wval;
  for (Fiber* f : lanes)
    if (f && ((mask >> f->lane) & 1u)) {
      std::memcpy(f->snap, vals, sizeof vals);
      f->state = St::Ready;
    }
}

void fiber_entry() {
  Group* g = g_group;
  Fiber* f = g->current;
  g_cur = &f->ts;
  (*g->body)();
  f->state = St::Done;
  BlockState& b = g->blocks[f->block];
  --b.live;
  --g->live;
  block_barrier_check(g, b, f->block);  // an exited thread no longer holds a barrier back
  if (g->cooperative) grid_barrier_check(g);
  swapcontext(&f->ctx, &g->sched);
  std::abort();  // never resumed
}

std::string describe(Group* g) {
  int counts[5] = {0};
  for (Fiber* f : g->fibers) counts[static_cast<int>(f->state)]++;
  char buf[200];
  std::snprintf(buf, sizeof buf, " (threads waiting at __syncthreads: %d, at a warp collective: %d, at grid.sync: %d; exited: %d)",
                counts[1], counts[2], counts[3], counts[4]);
  return buf;
}

// Run a group of fibers (one block, or a whole cooperative grid) to completion.
void run_group(Group& g, std::mt19937& rng, int mode) {
  std::vector<int> order(g.fibers.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  for (int pass = 0; g.live > 0; ++pass) {
    const int m = mode == 0 ? (pass % 2 == 0 ? 1 : 3) : mode;
    if (m == 1) std::sort(order.begin(), order.end(), std::greater<int>());
    else if (m == 2) std::sort(order.begin(), order.end());
    else std::shuffle(order.begin(), order.end(), rng);
    // Cooperative grid: run only the first block (in the permuted order) with a runnable
    // thread this pass (see run_grid in cuda_emu.h).
    int focus = -1;
    if (g.cooperative)
      for (Fiber* f : g.fibers)
        if (f->state == St::Ready) { focus = f->block; break; }
    bool progressed = false;
    for (int i : order) {
      Fiber* f = g.fibers[i];
      if (f->state != St::Ready || (focus >= 0 && f->block != focus)) continue;
      progressed = true;
      g.current = f;
      g_cur = &f->ts;
      swapcontext(&g.sched, &f->ctx);
      if (!g.error.empty()) return;
    }
    if (!progressed) {
      g.error = "deadlock: no CUDA thread can proceed" + describe(&g) +
                " -- a barrier in divergent code, or a warp collective whose mask names lanes that never arrive";
      return;
    }
  }
}

}  // namespace

void set_schedule(int mode, unsigned seed) {
  g_mode = mode;
  g_seed = seed;
}

void get_schedule(int* mode, unsigned* seed) {
  init_schedule_from_env();
  *mode = g_mode;
  *seed = g_seed;
}

[[noreturn]] void kernel_error(const char* msg) {
  Group* g = g_group;
  if (!g || !g->current) throw std::runtime_error(msg);
  g->error = msg;
  Fiber* f = g->current;
  swapcontext(&f->ctx, &g->sched);  // never resumed: the launch is abandoned
  std::abort();
}

unsigned lane_id() { return g_group->current->lane; }

void syncthreads() {
  Group* g = g_group;
  Fiber* f = g->current;
  BlockState& b = g->blocks[f->block];
  f->state = St::WaitBlock;
  ++b.arrived;
  block_barrier_check(g, b, f->block);
  // Always yield, even as the last arrival: the next phase starts in scheduler order.
  switch_to_scheduler();
}

namespace {
std::vector<std::string>& sites() {
  static std::vector<std::string> v;
  return v;
}
std::string& dropped() {
  static std::string d;
  return d;
}
}  // namespace

void syncthreads_at(const char* file, int line) {
  std::string site = std::string(file) + ":" + std::to_string(line);
  auto& v = sites();
  if (std::find(v.begin(), v.end(), site) == v.end()) v.push_back(site);
  if (!dropped().empty() && site == dropped()) return;  // switched off for a mutation test
  syncthreads();
}

void set_drop_barrier(const char* site) { dropped() = site ? site : ""; }
int barrier_site_count() { return static_cast<int>(sites().size()); }
const char* barrier_site(int i) { return sites().at(i).c_str(); }

namespace {
bool g_drop_grid_sync = false;
}
void set_drop_grid_sync(bool drop) { g_drop_grid_sync = drop; }
bool grid_sync_dropped() { return g_drop_grid_sync; }

void grid_sync() {
  Group* g = g_group;
  if (!g->cooperative) kernel_error("grid.sync() in a kernel that was not launched cooperatively");
  if (g_drop_grid_sync) return;  // switched off for a mutation test
  g->current->state = St::WaitGrid;
  ++g->grid_arrived;
  grid_barrier_check(g);
  switch_to_scheduler();
}

const uint64_t* warp_exchange(unsigned mask, uint64_t v) {
  Group* g = g_group;
  Fiber* f = g->current;
  if (!((mask >> f->lane) & 1u)) kernel_error("warp collective called by a lane that is not in its mask");
  for (unsigned l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && !g->warps[f->warp][l])
      kernel_error("warp collective mask names a lane that does not exist in this block");
  f->state = St::WaitWarp;
  f->wmask = mask;
  f->wval = v;
  warp_check(g, f->warp);
  switch_to_scheduler();
  return f->snap;
}

void syncwarp(unsigned mask) { (void)warp_exchange(mask, 0); }

void run_grid(dim3 grid, dim3 block, size_t smem_bytes, bool cooperative, const std::function<void()>& body) {
  init_schedule_from_env();
  const size_t nthreads = size_t(block.x) * block.y * block.z;
  const size_t nblocks = size_t(grid.x) * grid.y * grid.z;
  if (nthreads == 0 || nblocks == 0) throw std::runtime_error("emulator: launch with an empty grid or block");
  if (nthreads > 1024 || block.z > 64) throw std::runtime_error("emulator: more than 1024 threads per block");
  if (smem_bytes > 227 * 1024) throw std::runtime_error("emulator: more dynamic shared memory than an sm_90 block has");
  if (g_group) throw std::runtime_error("emulator: nested kernel launch");

  const dim3 saved_block = g_block_dim, saved_grid = g_grid_dim;
  g_block_dim = block;
  g_grid_dim = grid;
  std::mt19937 rng(g_seed);
  const int mode = g_mode;

  // Block execution order: permuted like the threads (reversed / random).
  std::vector<size_t> border(nblocks);
  for (size_t i = 0; i < nblocks; ++i) border[i] = i;
  if (mode == 1 || mode == 0) std::reverse(border.begin(), border.end());
  if (mode == 3) std::shuffle(border.begin(), border.end(), rng);

  const size_t per_group = cooperative ? nblocks : 1;
  const size_t warps_per_block = (nthreads + 31) / 32;
  std::string error;
  for (size_t first = 0; first < nblocks && error.empty(); first += per_group) {
    Group g;
    g.cooperative = cooperative;
    g.body = &body;
    g.blocks.resize(per_group);
    g.warps.assign(per_group * warps_per_block, std::vector<Fiber*>(32, nullptr));
    size_t fi = 0;
    for (size_t bi = 0; bi < per_group; ++bi) {
      const size_t lin = border[first + bi];
      uint3 bid{unsigned(lin % grid.x), unsigned((lin / grid.x) % grid.y), unsigned(lin / (size_t(grid.x) * grid.y))};
      BlockState& bs = g.blocks[bi];
      bs.smem.assign(smem_bytes + 16, 0xFF);  // poison: NaN as float, -1 as int
      bs.live = bs.nthreads = static_cast<int>(nthreads);
      for (size_t t = 0; t < nthreads; ++t, ++fi) {
        Fiber* f = get_fiber(fi);
        f->ts.tid = uint3{unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (size_t(block.x) * block.y))};
        f->ts.bid = bid;
        f->ts.smem = bs.smem.data();
        f->state = St::Ready;
        f->block = static_cast<int>(bi);
        f->warp = static_cast<int>(bi * warps_per_block + t / 32);
        f->lane = static_cast<unsigned>(t % 32);
        g.warps[f->warp][f->lane] = f;
        getcontext(&f->ctx);
        f->ctx.uc_stack.ss_sp = f->stack;
        f->ctx.uc_stack.ss_size = kStackBytes;
        f->ctx.uc_link = nullptr;
        makecontext(&f->ctx, fiber_entry, 0);
        g.fibers.push_back(f);
      }
    }
    g.live = static_cast<int>(g.fibers.size());
    g_group = &g;
    run_group(g, rng, mode);
    g_group = nullptr;
    error = g.error;
  }
  g_cur = nullptr;
  g_block_dim = saved_block;
  g_grid_dim = saved_grid;
  if (!error.empty()) throw std::runtime_error("emulated CUDA kernel failed: " + error);
}

}  // namespace emu
