#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif

/// Throws `AttentionError.outOfMemory` unless `bytes` can be allocated now. Every size a file or
/// a flag decides is asked of the system before it is allocated, because a failed allocation in
/// Swift ends the process (under `ulimit -v` or a container's limit, where it can fail). Sizes up
/// to 1 MiB are not asked: they cannot be what exhausts a machine.
package func checkAllocatable(_ bytes: Int, for what: @autoclosure () -> String) throws {
  guard bytes > 1 << 20 else { return }
  guard let probe = malloc(bytes) else {
    throw AttentionError.outOfMemory("cannot allocate \(formatBytes(bytes)) for \(what())")
  }
  free(probe)
}
