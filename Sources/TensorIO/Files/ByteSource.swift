import Tensors

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif

/// Where a reader's bytes come from, read front to back exactly once: an open file — a regular
/// file, or a pipe or FIFO (`--q <(…)` in a shell) — or bytes already in memory (tests, fuzzers).
///
/// Readers take the header's few bytes with `bytes(_:)` and read the data straight into the
/// tensor's own buffer with `read(into:)`, so a file's data is copied once, from the kernel into
/// its final place; nothing is allocated for the data before the header's sizes have been checked
/// against the file's size (when it is known) and the caller's limit.
///
/// Folders and devices are refused when opened: a device has no end (`/dev/zero`) or no data.
package final class ByteSource {
  /// The path (or other name) in error messages.
  package let name: String
  /// The bytes not yet read, when known in advance: a regular file's size, a buffer's length;
  /// `nil` for a pipe.
  package private(set) var remaining: Int?

  private let descriptor: Int32
  private let memory: [UInt8]
  private var position = 0

  /// Opens the file at `path` for reading.
  package init(path: String) throws {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else {
      let code = errno
      let message = code == ENOENT ? "no such file" : errorText(code)
      throw AttentionError.file(path: path, message: "cannot open: \(message)")
    }
    var info = stat()
    if fstat(descriptor, &info) == 0 {
      let kind = info.st_mode & S_IFMT
      if kind == S_IFDIR || kind == S_IFCHR || kind == S_IFBLK {
        close(descriptor)
        let what = kind == S_IFDIR ? "a folder" : "a device"
        throw AttentionError.file(path: path, message: "cannot read: it is \(what), not a file")
      }
      remaining = kind == S_IFREG ? Int(info.st_size) : nil
    }
    self.name = path
    self.descriptor = descriptor
    self.memory = []
  }

  /// Reads from `bytes`; `name` names them in messages.
  package init(bytes: [UInt8], name: String) {
    self.name = name
    self.descriptor = -1
    self.memory = bytes
    self.remaining = bytes.count
  }

  deinit {
    if descriptor >= 0 { close(descriptor) }
  }

  /// Fills `buffer` from the current position; returns how many bytes it read, fewer than
  /// `buffer.count` only at the end.
  package func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
    var filled = 0
    if descriptor < 0 {
      filled = min(buffer.count, memory.count - position)
      memory.withUnsafeBytes { source in
        guard filled > 0 else { return }
        buffer.baseAddress!.copyMemory(
          from: source.baseAddress! + position, byteCount: filled)
      }
    } else {
      while filled < buffer.count {
        let count = Glibc.read(descriptor, buffer.baseAddress! + filled, buffer.count - filled)
        if count < 0 {
          if errno == EINTR { continue }
          let code = errno
          throw AttentionError.file(path: name, message: "cannot read: \(errorText(code))")
        }
        if count == 0 { break }
        filled += count
      }
    }
    position += filled
    remaining = remaining.map { max(0, $0 - filled) }
    return filled
  }

  /// The next `count` bytes, or fewer at the end of the file. `count` must be small (a header):
  /// the caller bounds it.
  package func bytes(_ count: Int) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    let filled = try bytes.withUnsafeMutableBytes { try read(into: $0) }
    return Array(bytes[0..<filled])
  }

  /// Moves past the next `count` bytes without keeping them (a seek in a regular file, reads
  /// thrown away from a pipe); returns how many there were, fewer than `count` only at the end.
  package func skip(_ count: Int) throws -> Int {
    if descriptor >= 0, let remaining {
      let skipped = min(count, remaining)
      guard lseek(descriptor, off_t(skipped), SEEK_CUR) >= 0 else {
        let code = errno
        throw AttentionError.file(path: name, message: "cannot seek: \(errorText(code))")
      }
      position += skipped
      self.remaining = remaining - skipped
      return skipped
    }
    var skipped = 0
    var chunk = [UInt8](repeating: 0, count: min(count, 1 << 16))
    while skipped < count {
      let wanted = min(chunk.count, count - skipped)
      let filled = try chunk.withUnsafeMutableBytes {
        try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<wanted]))
      }
      skipped += filled
      if filled < wanted { break }
    }
    return skipped
  }

  /// Whether every byte has been read (for a pipe, one more read says).
  package func isAtEnd() throws -> Bool {
    if let remaining { return remaining == 0 }
    var byte: UInt8 = 0
    return try withUnsafeMutableBytes(of: &byte) { try read(into: $0) } == 0
  }
}

/// `count` floats read from `source` into a new array, each decoded from `stride` stored bytes
/// by `decode` (which sees the little-endian bytes of a chunk of elements, the chunk's place in
/// the array, and the index of its first element); `<f4` data on a
/// little-endian machine goes straight into the array. Throws `truncated(read)` with the number
/// of elements read when the source ends early.
package func readElements<Element>(
  _ count: Int, stride: Int, from source: ByteSource, direct: Bool,
  truncated: (Int) -> AttentionError,
  decode: (UnsafeRawBufferPointer, UnsafeMutableBufferPointer<Element>, Int) throws -> Void
) throws -> [Element] {
  try [Element](unsafeUninitializedCapacity: count) { buffer, initialized in
    adviseHugePages(UnsafeMutableRawBufferPointer(buffer))
    if direct && stride == MemoryLayout<Element>.stride {
      let filled = try source.read(into: UnsafeMutableRawBufferPointer(buffer))
      guard filled == count * stride else { throw truncated(filled / stride) }
    } else {
      // A chunk of stored elements at a time, decoded into their places.
      let chunkElements = max(1, (1 << 16) / stride)
      var chunk = [UInt8](repeating: 0, count: chunkElements * stride)
      var done = 0
      while done < count {
        let n = min(chunkElements, count - done)
        let filled = try chunk.withUnsafeMutableBytes {
          try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<(n * stride)]))
        }
        guard filled == n * stride else { throw truncated(done + filled / stride) }
        try chunk.withUnsafeBytes { raw in
          try decode(
            UnsafeRawBufferPointer(rebasing: raw[0..<(n * stride)]),
            UnsafeMutableBufferPointer(rebasing: buffer[done..<(done + n)]), done)
        }
        done += n
      }
    }
    initialized = count
  }
}

/// Asks the kernel to back a large new buffer with transparent huge pages (where the system
/// allows it only on request): reading 1 GiB into 4 KiB pages spends most of its time in a
/// quarter of a million page faults. Only whole 2 MiB pages inside the buffer are advised.
private func adviseHugePages(_ buffer: UnsafeMutableRawBufferPointer) {
  let huge = 2 << 20
  guard buffer.count >= 4 * huge, let base = buffer.baseAddress else { return }
  let start = (Int(bitPattern: base) + huge - 1) & ~(huge - 1)
  let end = (Int(bitPattern: base) + buffer.count) & ~(huge - 1)
  guard end > start, let pointer = UnsafeMutableRawPointer(bitPattern: start) else { return }
  _ = madvise(pointer, end - start, MADV_HUGEPAGE)
}

/// Refuses, before a reader allocates them, `bytes` (`nil`: more than an `Int` holds) over
/// `maxBytes`, and then any the system cannot allocate now. `what` names them in messages,
/// starting with the source.
package func checkReadBudget(_ bytes: Int?, maxBytes: Int, what: String) throws {
  guard let bytes, bytes <= maxBytes else {
    throw AttentionError.memoryBudget(
      MemoryBudgetExceeded(
        what: what, neededBytes: bytes, budgetBytes: maxBytes,
        advice: .other("read a smaller file")))
  }
  try checkAllocatable(bytes, for: what)
}

/// The machine's physical memory in bytes (`Int.max` when the system does not say): the default
/// limit of the readers.
package func physicalMemoryBytes() -> Int {
  let pages = sysconf(Int32(_SC_PHYS_PAGES))
  let pageSize = sysconf(Int32(_SC_PAGESIZE))
  guard pages > 0, pageSize > 0 else { return Int.max }
  let (bytes, overflow) = pages.multipliedReportingOverflow(by: pageSize)
  return overflow ? Int.max : bytes
}
