import AttentionKit
import Foundation
import Testing
import _TestSupport

/// Loading a layer from named tensors: each mistake is one error naming the tensor (with its
/// prefix) and, for shapes, what the layout expects.
@Suite("Weight layouts")
struct WeightLayoutTests {
  static func fixture(_ name: String) throws -> (MHACase, StateDict) {
    let found = try #require(try MHAFixtures.cases().first { $0.name == name })
    return (found, try MHAFixtures.stateDict(found.files.safetensors.file))
  }

  static func message(_ body: () throws -> Void) -> String {
    do {
      try body()
      return "no error"
    } catch {
      return "\(error)"
    }
  }

  @Test("a prefix that matches nothing")
  func prefixMatchesNothing() throws {
    let (_, tensors) = try Self.fixture("bert_kpm")
    let text = Self.message {
      _ = try MultiHeadAttention(
        stateDict: tensors, layout: .bert,
        options: .init(prefix: "encoder.layer.7.attention", heads: 4))
    }
    #expect(text.contains("no tensor name starts with the prefix \"encoder.layer.7.attention.\""))
  }

  @Test("a missing tensor names itself and the expected shape")
  func missingTensor() throws {
    let (fixture, original) = try Self.fixture("bert_kpm")
    var tensors = original
    tensors["\(fixture.prefix)self.value.bias"] = nil
    let text = Self.message {
      _ = try MultiHeadAttention(
        stateDict: tensors, layout: .bert, options: .init(prefix: fixture.prefix, heads: 4))
    }
    #expect(text.contains("encoder.layer.0.attention.self.value.bias\" is missing"), "\(text)")
    #expect(text.contains("[32]"), "\(text)")
  }

  @Test("a mis-shaped tensor names the layout's shape")
  func wrongShape() throws {
    let (fixture, original) = try Self.fixture("llama_gqa4_offset0")
    var tensors = original
    tensors["\(fixture.prefix)o_proj.weight"] = try Tensor(shape: [64, 63])
    let text = Self.message {
      _ = try MultiHeadAttention(
        stateDict: tensors, layout: .llama, options: .init(prefix: fixture.prefix, heads: 8))
    }
    #expect(text.contains("o_proj.weight\" has shape [64, 63]"), "\(text)")
    #expect(text.contains("expects [64, 64]"), "\(text)")
  }

  @Test("an extra tensor under the prefix is refused; other layers' tensors are not")
  func extraTensor() throws {
    let (fixture, original) = try Self.fixture("torch_kpm_full_pad")
    var tensors = original
    #expect(!fixture.files.safetensors.otherTensors.isEmpty)
    _ = try MultiHeadAttention(
      stateDict: tensors, layout: .torch, options: .init(prefix: fixture.prefix, heads: 4))
    // kdim/vdim's separate projection, which the torch layout does not read.
    tensors["\(fixture.prefix)k_proj_weight"] = try Tensor(shape: [32, 32])
    let text = Self.message {
      _ = try MultiHeadAttention(
        stateDict: tensors, layout: .torch, options: .init(prefix: fixture.prefix, heads: 4))
    }
    #expect(text.contains("k_proj_weight\" is unexpected"), "\(text)")
    // add_bias_kv's bias_k goes with bias_v.
    tensors = original
    tensors["\(fixture.prefix)bias_k"] = try Tensor(shape: [1, 1, 32])
    let lone = Self.message {
      _ = try MultiHeadAttention(
        stateDict: tensors, layout: .torch, options: .init(prefix: fixture.prefix, heads: 4))
    }
    #expect(lone.contains("bias_v\" is missing"), "\(lone)")
  }

  @Test("H that does not divide E, and Hkv that does not divide H")
  func headCounts() throws {
    let (bert, bertTensors) = try Self.fixture("bert_kpm")
    let text = Self.message {
      _ = try MultiHeadAttention(
        stateDict: bertTensors, layout: .bert, options: .init(prefix: bert.prefix, heads: 5))
    }
    #expect(text.contains("5 heads do not divide E = 32"), "\(text)")
    let (llama, llamaTensors) = try Self.fixture("llama_gqa4_offset0")
    let grouped = Self.message {
      _ = try MultiHeadAttention(
        stateDict: llamaTensors, layout: .llama,
        options: .init(prefix: llama.prefix, heads: 8, keyValueHeads: 3))
    }
    #expect(grouped.contains("k_proj.weight\" has shape [16, 64]"), "\(grouped)")
    let torchHeads = Self.message {
      _ = try MultiHeadAttention(
        stateDict: bertTensors, layout: .bert,
        options: .init(prefix: bert.prefix, heads: 4, keyValueHeads: 2))
    }
    #expect(torchHeads.contains("as many key/value heads as query heads"), "\(torchHeads)")
    // Hkv not dividing H, from the layer's own initializer.
    let layer = Self.message {
      let e = 24
      func linear(_ o: Int) throws -> Linear {
        try Linear(inputFeatures: e, outputFeatures: o, seed: 1, stream: 0)
      }
      _ = try MultiHeadAttention(
        queryProjection: linear(24), keyProjection: linear(12), valueProjection: linear(12),
        outputProjection: Linear(inputFeatures: 24, outputFeatures: e, seed: 1, stream: 2),
        heads: 6, keyValueHeads: 4)
    }
    #expect(layer.contains("must divide the query heads"), "\(layer)")
  }
}
