import TensorIO

/// libFuzzer entry point for the `.npy` reader: every input is a candidate `.npy` file, given to
/// `NPY.decode` and to `NPY.decodeDoubles` (which decodes and then re-reads `<f8` data as
/// `Double`, indexing the bytes on the strength of `decode`'s checks). Each array that decodes
/// is then read as `--mask` reads it, with `keepMask(source:)` (0/1 of any dtype; any other
/// value an error naming its index, which walks the shape back from a flat index).
///
/// Built by Scripts/fuzz.sh against the TensorIO module and its public API alone (not a SwiftPM
/// target). A decode may succeed or throw; anything else (a trap, an out-of-bounds access that
/// AddressSanitizer sees, a leak, a hang) is a bug the fuzzer reports with the input causing it.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
  let bytes = Array(UnsafeBufferPointer(start: data, count: size))
  if let array = try? NPY.decode(bytes, source: "fuzz.npy") {
    _ = try? array.keepMask(source: "fuzz.npy")
  }
  _ = try? NPY.decodeDoubles(bytes, source: "fuzz.npy")
  return 0
}
