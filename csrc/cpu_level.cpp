// Which x86-64 micro-architecture level this CPU (and its OS) runs, from cpuid. Built for baseline
// x86-64 on its own, so lomix_kernels/cpu.py can ask before it loads a kernel variant that may use
// instructions this CPU lacks.
extern "C" int lomix_cpu_x86_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  return v4 ? 4 : v3 ? 3 : 1;  // 4: AVX-512 F/BW/CD/DQ/VL; 3: AVX2, FMA, BMI1/2; 1: baseline
#else
  return 0;  // not x86-64
#endif
}
