import TensorIO

/// libFuzzer entry point for `SafeTensors.decode`: every input is a candidate safetensors file.
///
/// Built by Scripts/fuzz.sh against the TensorIO module and its public API alone (not a SwiftPM
/// target). A decode may succeed or throw; anything else (a trap, an out-of-bounds access that
/// AddressSanitizer sees, a leak, a hang) is a bug the fuzzer reports with the input causing it.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
  let bytes = Array(UnsafeBufferPointer(start: data, count: size))
  _ = try? SafeTensors.decode(bytes, source: "fuzz.safetensors")
  return 0
}
