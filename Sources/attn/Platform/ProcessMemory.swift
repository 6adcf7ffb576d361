#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#endif

/// The process's resident memory as Linux reports it in `/proc/self/status`, and the means to
/// measure the peak of one stretch of code:
///
///     releaseFreeMemory(); let before = status()?.resident
///     let reset = resetPeak()          // VmHWM := VmRSS
///     work()
///     growth = status()!.peak − before  // only meaningful when `reset` succeeded
///
/// Without the reset, `VmHWM` is the peak of the whole process so far, and a run would look free
/// once a larger one had run before it.
enum ProcessMemory {
  struct Status {
    /// `VmRSS`, resident bytes now.
    var resident: Int
    /// `VmHWM`, the peak of `resident` since the start or the last `resetPeak()`.
    var peak: Int
    /// `VmSize`, the address space in use (what `ulimit -v` limits).
    var virtual: Int
  }

  /// `VmRSS` and `VmHWM` in bytes, or `nil` when `/proc/self/status` cannot be read (not Linux).
  static func status() -> Status? {
    guard let text = readProcFile("/proc/self/status") else { return nil }
    var resident: Int?
    var peak: Int?
    var virtual = 0
    for line in text.split(separator: "\n") {
      // "VmHWM:\t  123456 kB"
      let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
      guard fields.count >= 2, let value = Int(fields[1]) else { continue }
      let bytes = fields.count >= 3 && fields[2] == "kB" ? value * 1024 : value
      if fields[0] == "VmRSS:" { resident = bytes }
      if fields[0] == "VmHWM:" { peak = bytes }
      if fields[0] == "VmSize:" { virtual = bytes }
    }
    guard let resident, let peak else { return nil }
    return Status(resident: resident, peak: peak, virtual: virtual)
  }

  /// Resets `VmHWM` to the current `VmRSS` by writing `5` to `/proc/self/clear_refs` (Linux ≥ 4.0).
  /// Returns `false` when that file is missing or not writable (some containers mount /proc
  /// read-only), in which case peaks cannot be measured per run.
  static func resetPeak() -> Bool {
    let descriptor = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC)
    guard descriptor >= 0 else { return false }
    defer { close(descriptor) }
    var byte: UInt8 = UInt8(ascii: "5")
    return write(descriptor, &byte, 1) == 1
  }

  /// Why `resetPeak()` fails, for a note: the `strerror` text of opening the file.
  static func resetPeakProblem() -> String? {
    let descriptor = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC)
    if descriptor >= 0 {
      close(descriptor)
      return nil
    }
    return String(cString: strerror(errno))
  }

  /// Asks glibc to return freed heap memory to the system (`malloc_trim(0)`), so that a run's
  /// allocations show up as new resident pages rather than reusing what an earlier run freed.
  /// Looked up at run time: Swift's Glibc module does not export it, and other C libraries lack it.
  static func releaseFreeMemory() {
    typealias MallocTrim = @convention(c) (Int) -> Int32
    guard let handle = dlopen(nil, RTLD_NOW) else { return }
    defer { dlclose(handle) }
    guard let symbol = dlsym(handle, "malloc_trim") else { return }
    _ = unsafeBitCast(symbol, to: MallocTrim.self)(0)
  }

  /// The whole of a `/proc` file (their size reads as 0, so read until end of file).
  private static func readProcFile(_ path: String) -> String? {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else { return nil }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
      let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
      if count < 0 && errno == EINTR { continue }
      if count <= 0 { break }
      bytes.append(contentsOf: chunk[0..<count])
    }
    return String(decoding: bytes, as: UTF8.self)
  }
}
