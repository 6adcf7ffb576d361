#if canImport(Glibc)
  import Glibc
#endif

/// Lets `attn bench` time the kernels as a long-running program sees them.
///
/// glibc serves allocations above its mmap threshold (128 KiB at first) with fresh pages from the
/// kernel and returns them on `free`, so every call of a kernel pays page faults again for its
/// inputs, outputs and tiles. On the VMs we measure on, that cost 5 ms of a 13 ms relative-
/// position call. A program that calls the kernels repeatedly keeps that memory; so does `attn
/// bench` after this, which raises the mmap threshold to 256 MiB and keeps up to 1 GiB of freed
/// memory (`mallopt`, the same as the environment variables `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_`, which `Scripts/compare/compare_pytorch.py` sets for PyTorch and numpy
/// too). Not used by `attn complexity`, whose peak-RSS column would then count reused memory as
/// free.
enum WarmAllocator {
  static func keepFreedMemory() {
    #if canImport(Glibc)
      // malloc.h's `int mallopt(int, int)`, which the Glibc module leaves out.
      typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
      guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
      let mallopt = unsafeBitCast(symbol, to: Mallopt.self)
      _ = mallopt(-3, 256 << 20)  // M_MMAP_THRESHOLD
      _ = mallopt(-1, 1 << 30)  // M_TRIM_THRESHOLD
    #endif
  }
}
