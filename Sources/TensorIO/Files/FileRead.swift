#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif
import Tensors

/// The whole content of the file at `path`, with errors as `AttentionError.file` naming it.
///
/// Reads until end of file rather than trusting the size `fstat` reports, which can change under
/// us or be zero for special files. Pipes and FIFOs are read (`--q <(…)` in a shell); folders and
/// devices are refused (`/dev/zero` never ends). A file, or a pipe's stream, larger than the
/// machine's physical memory is refused before it is read whole: it could not be held anyway,
/// and allocating for it would end the process instead of reporting the problem.
func readFileBytes(atPath path: String) throws -> [UInt8] {
  let descriptor = open(path, O_RDONLY | O_CLOEXEC)
  guard descriptor >= 0 else {
    let code = errno
    let message = code == ENOENT ? "no such file" : errorText(code)
    throw AttentionError.file(path: path, message: "cannot open: \(message)")
  }
  defer { close(descriptor) }

  var info = stat()
  let known = fstat(descriptor, &info) == 0
  if known {
    switch info.st_mode & S_IFMT {
    case S_IFDIR:
      throw AttentionError.file(path: path, message: "cannot read: it is a folder, not a file")
    case S_IFCHR, S_IFBLK:
      throw AttentionError.file(path: path, message: "cannot read: it is a device, not a file")
    default: break
    }
  }
  let limit = physicalMemoryBytes()
  func tooLarge(_ size: String) -> AttentionError {
    .file(
      path: path,
      message: "cannot read: it is \(size) bytes, more than this machine's memory (\(limit) bytes)")
  }
  var bytes: [UInt8] = []
  if known && info.st_size > 0 {
    guard info.st_size <= limit else { throw tooLarge(String(info.st_size)) }
    bytes.reserveCapacity(Int(info.st_size))
  }
  var chunk = [UInt8](repeating: 0, count: 1 << 16)
  while true {
    let count = chunk.withUnsafeMutableBytes { buffer in
      read(descriptor, buffer.baseAddress, buffer.count)
    }
    if count < 0 {
      if errno == EINTR { continue }
      let code = errno
      throw AttentionError.file(path: path, message: "cannot read: \(errorText(code))")
    }
    if count == 0 { return bytes }
    guard bytes.count <= limit - count else { throw tooLarge("over \(limit)") }
    bytes.append(contentsOf: chunk[0..<count])
  }
}

/// The machine's physical memory in bytes (`Int.max` when the system does not say).
func physicalMemoryBytes() -> Int {
  let pages = sysconf(Int32(_SC_PHYS_PAGES))
  let pageSize = sysconf(Int32(_SC_PAGESIZE))
  guard pages > 0, pageSize > 0 else { return Int.max }
  let (bytes, overflow) = pages.multipliedReportingOverflow(by: pageSize)
  return overflow ? Int.max : bytes
}
