"""Fine-tune GPT-2 on a text file with transformers' Trainer, attention through flashpatch.

    python examples/finetune_gpt2.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --max-steps 100
    python examples/finetune_gpt2.py --text FILE --model gpt2          # hub weights (needs the hub)

Without --model: a randomly initialised GPT-2 124M (or smaller with --layers/--width), byte tokens.
GPT-2's attention dropout (attn_pdrop, 0.1 by default) runs inside flashpatch's kernels;
--attn-dropout overrides it.
"""

import _finetune


def main():
    p = _finetune.common_args(__doc__)
    p.add_argument("--model", default=None, help="Hub id or local dir; default: random-init GPT-2.")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768, help="Hidden size (head dim stays 64).")
    p.add_argument("--attn-dropout", type=float, default=None)
    args = p.parse_args()
    _finetune.interpreter_without_gpu()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    torch.manual_seed(args.seed)
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        encode = lambda text: tokenizer(text).input_ids  # noqa: E731
        if args.attn_dropout is not None:
            model.config.attn_pdrop = args.attn_dropout
            for block in model.transformer.h:
                block.attn.attn_dropout.p = args.attn_dropout
    else:
        config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                            n_positions=max(1024, args.context), vocab_size=256 + 1, bos_token_id=256,
                            eos_token_id=256,  # the one id past the bytes (GPT-2's own 50256 is outside this vocab)
                            **({} if args.attn_dropout is None else {"attn_pdrop": args.attn_dropout}))
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        encode = lambda text: list(text.encode("utf-8"))  # noqa: E731
    model = model.to(_finetune.device())
    _finetune.train(model, encode, args, "gpt2")


if __name__ == "__main__":
    main()
