// Entry points of the emulator's self-test kernels (selftest.cpp), for register.cpp.
#pragma once
#include <cstdint>

namespace emu_selftest {
void neighbor(const float* in, float* out, int blocks, int threads, int iters, bool barrier_a, bool barrier_b);
void warp(const float* in, int n, float* xor_sum, float* down_sum, float* bcast, float* prefix, unsigned* ballot,
          int* all_any);
void atomics(const int* bins, const float* vals, int n, int* hist, float* total, int* max_out, int* cas);
void grid(const float* in, float* partial, float* out, int blocks, int threads, bool barrier);
void index(int* out, const unsigned* grid, const unsigned* block);
void convert(const float* in, uint16_t* half_bits, uint16_t* bf16_bits, float* half_back, float* bf16_back, int n);
void divergent_barrier(float* out);
void set_schedule(int mode, unsigned seed);
void get_schedule(int* mode, unsigned* seed);
void set_drop_barrier(const char* site);
int barrier_site_count();
const char* barrier_site(int i);
void set_drop_grid_sync(bool drop);
}  // namespace emu_selftest
