//! `memsync bench report`: the results of `memsync bench all --out DIR` as a Markdown report
//! with SVG plots (`docs/bench/`).
//!
//! A crate of its own, apart from `memsync-bench`, so that it (and its tests) builds from
//! `serde_json` alone in seconds; it knows the suites only through their output. Figures are
//! shown as the suites printed them: medians with min and max, ratios of same-run medians
//! (taken by the suites, never here), published figures labelled as such and never divided by.

pub mod compare;
pub mod markdown;
pub mod plots;
pub mod results;
pub mod svg;
pub mod targets;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

pub use results::{Machine, Record, parse_machine, parse_results};

/// The file names `memsync bench all --out DIR` writes.
pub const RESULTS_FILE: &str = "results.jsonl";
pub const MACHINE_FILE: &str = "machine.json";

/// Read `input/results.jsonl` and `input/machine.json`, write `out/README.md` and the plots
/// (`out/*.svg`, replacing the SVG files there), and return the paths written.
pub fn generate(input: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let rpath = input.join(RESULTS_FILE);
    let mpath = input.join(MACHINE_FILE);
    let rtext = std::fs::read_to_string(&rpath).with_context(|| {
        format!(
            "reading {} (written by `memsync bench all --out DIR`)",
            rpath.display()
        )
    })?;
    let mtext =
        std::fs::read_to_string(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
    let records = parse_results(&rpath.display().to_string(), &rtext)?;
    let machine = parse_machine(&mpath.display().to_string(), &mtext)?;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Plots of an earlier run that this one cannot draw must not stay behind.
    for e in std::fs::read_dir(out)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "svg") {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let plots = plots::all(&records, &machine);
    let mut written = Vec::new();
    for p in &plots {
        let path = out.join(&p.file);
        std::fs::write(&path, p.chart.render())
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    let md = markdown::report(&records, &machine, &plots);
    let path = out.join("README.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    Ok(written)
}

/// `memsync bench compare`: read two files of `--json` lines (one or more rounds each) and
/// render the A/B table of [`compare::compare`].
pub fn compare_files(base: &Path, new: &Path) -> Result<String> {
    let read = |p: &Path| -> Result<Vec<Record>> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        parse_results(&p.display().to_string(), &text)
    };
    let (rows, unmatched) = compare::compare(&read(base)?, &read(new)?);
    Ok(compare::render(&rows, &unmatched))
}
