// `import AttentionKit` brings `Tensor`, `AttentionError` and the message helpers with it.
@_exported import Tensors
