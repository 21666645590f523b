"""The study report: results.json as markdown and a standalone HTML page, with PNG plots.

Every number shown is read from the study's results (results.json); nothing is recomputed here.
The report is built once as a list of blocks (heading, paragraph, table, image) and rendered to
both formats, so they cannot drift apart. A section whose data is absent says so instead of failing.
"""

from collections.abc import Callable
from pathlib import Path

from vlmerge.io.atomic import atomic_path
from vlmerge.study.claims import protocol_name
from vlmerge.study.report_blocks import Block, Heading, Paragraph, Table, fmt, interval, to_html, to_markdown
from vlmerge.study.report_sections import Sections
from vlmerge.study.results import StudyResults

__all__ = ["fmt", "interval", "write_report"]  # fmt and interval live with the blocks; callers take them from here

SCALE_NOTE = (
    "These are small-scale runs: {size}-sized models{start} pre-trained for {steps} steps in all on "
    "{pairs} image-text pairs, then fine-tuned for {finetune} steps per task ({tasks}). The paper pre-trains "
    "base-size models on millions of web image-text pairs and evaluates on COCO, Flickr30k, VQAv2 and "
    "NLVR2. Absolute numbers are not comparable with the paper's; what can be compared is the direction "
    "of each comparison, and a small run can miss effects that only appear at scale."
)


class _Report(Sections):
    """The sections in the report's order, under its header. Each section returns [] when its data is
    absent; `blocks` then says the section was not part of the recipe."""

    def header(self) -> list[Block]:
        recipe, timing = self.recipe, self.r.timing
        ran = (
            f"Recipe {recipe.name}: {fmt(len(self.r.models))} models evaluated on {fmt(len(self.r.tasks))} tasks "
            f"({', '.join(self.r.tasks) or 'none'}) under {', '.join(map(protocol_name, self.r.protocols))}, "
            f"random seeds {', '.join(map(str, recipe.random_seeds))} (sweeps: "
            f"{', '.join(map(str, recipe.sweep_random_seeds))}). Wall time {fmt(timing and timing.seconds, 1)} s; "
            f"stages run: {fmt(timing and timing.stages_run)}, taken from the cache: "
            f"{fmt(timing and timing.stages_cached)}."
        )
        if timing is not None:
            ran += f" Its {fmt(timing.stages)} distinct stages took {fmt(timing.stage_seconds, 1)} s when they ran."
        flat = (str, int, float, bool, type(None))  # nested recipe settings stay in results.json
        settings = [
            [k, ", ".join(map(fmt, v)) if isinstance(v, list) else fmt(v)]
            for k, v in recipe.model_dump(mode="json").items()
            if isinstance(v, flat) or (isinstance(v, list) and all(isinstance(x, flat) for x in v))
        ]
        table: list[Block] = [Table(["recipe setting", "value"], settings)] if settings else []
        task_data = ", ".join(f"{task} on {recipe.data_for(task).dataset}" for task in self.r.tasks)
        scale = SCALE_NOTE.format(
            size=recipe.model.size,
            start=", starting from the pretrained ViT-S/14," if recipe.init == "pretrained" else "",
            steps=fmt(recipe.total_steps),
            pairs=" + ".join(recipe.data.names),
            finetune=fmt(recipe.finetune.steps),
            tasks=task_data,
        )
        how = (
            "Every score is the mean over random seeds with its 95 % interval in brackets, from one two-level "
            "bootstrap (seeds, then test examples; a test set shared by the seeds is resampled once for all of "
            "them) and Student's t with seeds - 1 degrees of freedom. Every comparison is a paired difference "
            "(same seed, same test examples) with an exact sign-flip test over seeds, Holm-adjusted over the "
            "comparisons its claim rests on. It reproduces the paper when its interval excludes zero on the "
            "paper's side and its adjusted p is below 0.05, contradicts it when that holds on the other side, "
            "is equivalent when two one-sided tests show it within the stated margin, and is inconclusive "
            "otherwise, with the smallest difference the run could have detected."
        )
        return [
            Heading(f"Study report: {recipe.name}", 1),
            Heading("What was run"),
            Paragraph(ran),
            *table,
            Paragraph(scale),
            Paragraph(how),
        ]

    def blocks(self) -> list[Block]:
        sections: list[tuple[str, str, Callable[[], list[Block]]]] = [
            ("Paper vs this run", "claims", self.claims),
            ("Pre-training gain (no-pre-training control)", "control", self.control),
            ("Baselines at equal total steps", "baseline models", self.baselines),
            ("The path between the experts", "interpolation path", self.path),
            ("Dose-response: how far the experts travel", "modality-specific length sweep", self.dose),
            ("Merging methods", "merging methods", self.methods),
            ("Seed pre-training length", "seed fraction sweep", lambda: self.sweep("seed_fraction", "seed fraction")),
            ("Interpolation ratio", "interpolation ratio sweep", lambda: self.sweep("interpolation_ratio", "ratio")),
            ("Architecture", "architecture sweep", lambda: self.sweep("architecture", "expert placement", False)),
            ("Mergeability metrics", "mergeability points", self.mergeability),
            ("Retrieval gallery", "retrieval gallery", self.gallery),
            ("Full results", "models", self.full_table),
        ]
        absent = "Not part of this recipe: results.json has no {}."
        return [
            *self.header(),
            *(
                block
                for title, what, build in sections
                for block in [Heading(title), *(build() or [Paragraph(absent.format(what))])]
            ),
        ]


def write_report(study_dir: Path, results: StudyResults) -> dict[str, Path]:
    """Write report.md, report.html and plots/*.png under `study_dir`; return every path written by name."""
    study_dir = Path(study_dir)
    report = _Report(study_dir, results)
    blocks = report.blocks()
    title = next(b.text for b in blocks if isinstance(b, Heading))
    written = {"markdown": study_dir / "report.md", "html": study_dir / "report.html"}
    for key, text in (("markdown", to_markdown(blocks)), ("html", to_html(blocks, title))):
        with atomic_path(written[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return {**written, **report.plots}
