import Tensors

extension ModelLayerPlan {
  /// The layer from its tensors (`tensorNames(in:)` of the model's files, read): every tensor the
  /// family expects, with its exact shape, and nothing else under the prefix; an error names the
  /// tensor otherwise.
  public func build(_ tensors: StateDict) throws -> MultiHeadAttention {
    if family == .bert {
      return try MultiHeadAttention(
        stateDict: tensors, layout: .bert,
        options: .init(prefix: prefix, heads: heads, layerNormEpsilon: layerNormEpsilon))
    }
    var reader = ParameterReader(
      stateDict: tensors, prefix: prefix, owner: "\(family.rawValue)'s config")
    let (h, hkv, d, e) = (heads, keyValueHeads, headDim, hidden)
    func has(_ name: String) -> Bool { tensors[prefix + name] != nil }
    let query: Linear
    let key: Linear
    let value: Linear
    let output: Linear
    var terms = ScoreTerms(softcap: softcap)
    var norms: (RMSNorm, RMSNorm)?
    switch family {
    case .phi3:
      let fused = try reader.linear("qkv_proj", out: (h + 2 * hkv) * d, in: e, bias: false)
      (query, key, value) = try (
        fused.rows(0..<(h * d)), fused.rows((h * d)..<((h + hkv) * d)),
        fused.rows(((h + hkv) * d)..<((h + 2 * hkv) * d))
      )
      output = try reader.linear("o_proj", out: e, in: h * d, bias: false)
    case .bloom:
      // Rows [H, 3, D]: head h's query, key and value rows in turn.
      let fused = try reader.linear("query_key_value", out: 3 * h * d, in: e, bias: true)
      func part(_ p: Int) throws -> Linear {
        var rows: [Int] = []
        for head in 0..<h {
          let first = (3 * head + p) * d
          rows += Array(first..<(first + d))
        }
        return try fused.rows(rows)
      }
      (query, key, value) = (try part(0), try part(1), try part(2))
      output = try reader.linear("dense", out: e, in: h * d, bias: true)
      terms.positionBiases = [.alibi(slopes: PositionBias.bloomSlopes(heads: h))]
    case .t5:
      query = try reader.linear("q", out: h * d, in: e, bias: false)
      key = try reader.linear("k", out: h * d, in: e, bias: false)
      value = try reader.linear("v", out: h * d, in: e, bias: false)
      output = try reader.linear("o", out: e, in: h * d, bias: false)
      reader.ignore("relative_attention_bias.weight")
      if let rule = t5Table {
        guard let table = tensors[rule.name] else {
          throw AttentionError.parameter(
            name: rule.name, message: "is missing (every T5 layer reads block 0's table)")
        }
        guard table.rank == 2, table.shape[1] == h else {
          throw AttentionError.parameter(
            name: rule.name,
            message: "has shape \(shapeForMessage(table.shape)), expected [buckets, \(h)]")
        }
        terms.positionBiases = [
          .t5(table: table, maxDistance: rule.maxDistance, bidirectional: rule.bidirectional)
        ]
      }
    default:
      query = try reader.linear("q_proj", out: h * d, in: e, bias: has("q_proj.bias"))
      key = try reader.linear("k_proj", out: hkv * d, in: e, bias: has("k_proj.bias"))
      value = try reader.linear("v_proj", out: hkv * d, in: e, bias: has("v_proj.bias"))
      output = try reader.linear("o_proj", out: e, in: h * d, bias: has("o_proj.bias"))
      if family == .qwen3 || family == .gemma3 {
        let offset: Float = family == .gemma3 ? 1 : 0
        norms = (
          try RMSNorm(
            weight: reader.tensor("q_norm.weight", [d]), epsilon: normEpsilon, offset: offset),
          try RMSNorm(
            weight: reader.tensor("k_norm.weight", [d]), epsilon: normEpsilon, offset: offset)
        )
      }
      if family == .gptOss { terms.sinks = try reader.tensor("sinks", [h]).scalars }
    }
    reader.ignore("rotary_emb.inv_freq")
    try reader.checkNoOthers(among: tensors.names.filter { $0.hasPrefix(prefix) })
    return try MultiHeadAttention(
      queryProjection: query, keyProjection: key, valueProjection: value,
      outputProjection: output, heads: h, keyValueHeads: hkv, rotary: rotary,
      queryNorm: norms?.0, keyNorm: norms?.1, scale: exactScale, terms: terms)
  }
}

extension Linear {
  /// The layer of rows `rows` of this one (and of its bias).
  func rows<S: Sequence<Int>>(_ rows: S) throws -> Linear {
    let width = inputFeatures
    let picked = Array(rows)
    var weights: [Float] = []
    weights.reserveCapacity(picked.count * width)
    for r in picked { weights += weight.scalars[(r * width)..<((r + 1) * width)] }
    return try Linear(
      weight: Tensor(shape: [picked.count, width], scalars: weights),
      bias: bias.map { b in try Tensor(shape: [picked.count], scalars: picked.map { b.scalars[$0] })
      })
  }
}
