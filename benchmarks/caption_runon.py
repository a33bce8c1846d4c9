"""Did RL change what the model sees, or only where its caption stops? tiny_vlm.caption_accuracy counts a caption
right only when the whole answer matches; a model that reads the frame but then runs on into task-answer text
(`red box ahead right, far", "action": ...`) scores 0 there. This prints, per model, that exact match and the share
whose answer is right up to its first double quote, on the same held-out frames (docs/results.md, WallGap):
    python -m benchmarks.caption_runon --env-id MiniWorld-WallGap-v0 tiny \
        runs/grid_paper/MiniWorld-WallGap-v0/vldac/seed1/model
"""
import argparse


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="model directories (vldac.py --save-dir) or `tiny`")
    parser.add_argument("--env-id", required=True, help="the env whose held-out frames are captioned")
    parser.add_argument("--num-frames", type=int, default=200, help="held-out frames (default: 200, as the probe)")
    args = parser.parse_args()
    import torch

    import tiny_vlm
    import vlm

    torch.set_num_threads(1)
    print("| model | exact caption | right up to the first quote |\n|---|---|---|")
    for model_id in args.models:
        model, processor = vlm.load_policy(model_id, env_id=args.env_id)
        answers, truths = tiny_vlm.caption_answers(model, processor, args.env_id, args.num_frames)  # the probe's
        exact = sum(a.strip() == t for a, t in zip(answers, truths)) / len(truths)
        before_quote = sum(a.split('"')[0].strip() == t for a, t in zip(answers, truths)) / len(truths)
        print(f"| {model_id} | {exact:.3f} | {before_quote:.3f} |", flush=True)


if __name__ == "__main__":
    main()
