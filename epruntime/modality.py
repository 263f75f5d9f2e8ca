"""Token modalities: every token of the MoE-VLM is text or vision (the [S, B] modality tensors of
`epruntime.runtime.TokenStream`, the ledger's and the traces' modality columns)."""

TEXT, VISION = 0, 1
