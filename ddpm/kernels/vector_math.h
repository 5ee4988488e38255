// What the element-wise loops of the native operators share: a vectorisable exp, blocked float
// sums, and the attribute that compiles a loop for AVX2 as well as for any x86-64.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// GCC compiles a generic and an AVX2+FMA body and picks one at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DDPM_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DDPM_VECTOR_CLONES
#endif

namespace ddpm {

// exp as Cephes' expf (a degree-6 polynomial on [-ln2/2, ln2/2] times 2^n): within 2 float ulps
// for x in [-87, 88]; a loop of it vectorises (with -fno-trapping-math, build.py), std::exp does not.
inline float FastExp(float x) {
  x = x > 88.3f ? 88.3f : (x < -87.3f ? -87.3f : x);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;  // ln 2 in two parts, so that r is exact
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return poly * scale;
}

constexpr int kLanes = 8;       // float partial sums the compiler keeps in one AVX register
constexpr int64_t kBlock = 512;  // values summed in float before the partial sums move to double

// Sums over n values (f(i) each) in float lanes per block of kBlock, blocks added in double: as
// accurate as a double loop for these sizes, and vectorised (a plain float reduction is not).
template <typename Term>
inline double BlockedSum(int64_t n, Term term) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    float lanes[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += term(i + j);
    }
    double block = 0.0;
    for (int j = 0; j < kLanes; ++j) block += lanes[j];
    for (; i < stop; ++i) block += term(i);
    total += block;
  }
  return total;
}

}  // namespace ddpm
