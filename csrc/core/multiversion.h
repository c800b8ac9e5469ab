// Internal: compile a hot function for x86-64-v3 (AVX2, FMA, POPCNT) and for the
// baseline, picked at load time (GCC function multiversioning; no effect elsewhere).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYENGINE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYENGINE_MULTIVERSION
#endif
