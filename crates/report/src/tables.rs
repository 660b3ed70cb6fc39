//! The tables of a report, as typed rows (written to CSV by serde) and as
//! Markdown: the paper's seed table per eval set ([`SetRow`]), the finished
//! runs one by one with their restarts ([`RunRow`]), the grid's axes against
//! top-1 ([`GridRow`]) and the comparison of two sweeps ([`ComparisonRow`]).

use crate::runs::{display_name, Sweep, VAL};
use crate::stats::{self, Summary};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One line of `report.csv`: the final top-1 of one eval set over the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetRow {
    /// Eval set (`val`, `real`, `v2`).
    pub set: String,
    /// Finished runs that evaluated it.
    pub n: usize,
    /// Mean top-1 (percent).
    pub mean: f64,
    /// Sample standard deviation (n − 1); empty for one run.
    pub std: Option<f64>,
    /// Best run.
    pub max: f64,
    /// Worst run.
    pub min: f64,
    /// The seed-0 run, when exactly one finished run has seed 0.
    pub seed0: Option<f64>,
    /// Lower end of the mean's 95% confidence interval (Student t).
    pub ci95_low: Option<f64>,
    /// Upper end.
    pub ci95_high: Option<f64>,
}

/// The [`SetRow`]s of a sweep, [`crate::runs::VAL`] first.
pub fn set_rows(sweep: &Sweep) -> Vec<SetRow> {
    sweep
        .sets()
        .into_iter()
        .filter_map(|set| {
            let s = Summary::of(&sweep.finals(&set))?;
            Some(SetRow {
                seed0: sweep.seed0(&set),
                n: s.n,
                mean: s.mean,
                std: s.std,
                max: s.max,
                min: s.min,
                ci95_low: s.ci95.map(|c| c.0),
                ci95_high: s.ci95.map(|c| c.1),
                set,
            })
        })
        .collect()
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}"))
}

/// The paper's table in Markdown (two decimals).
pub fn set_table_markdown(rows: &[SetRow]) -> String {
    let mut out = String::from(
        "| set | mean | std | max | min | seed 0 | 95% CI of the mean | n |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ci = match (r.ci95_low, r.ci95_high) {
            (Some(lo), Some(hi)) => format!("{lo:.2} – {hi:.2}"),
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {:.2} | {:.2} | {} | {} | {} |",
            display_name(&r.set),
            r.mean,
            opt(r.std, 2),
            r.max,
            r.min,
            opt(r.seed0, 2),
            ci,
            r.n
        );
    }
    out
}

/// One line of `runs.csv`: one finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    /// The cell id (its run folder's name).
    pub id: String,
    /// Its seed.
    pub seed: u64,
    /// Final val top-1 (percent); every finished run has one.
    pub val_top1: Option<f64>,
    /// Generations it trained in (1: in one go; also a run without
    /// generation records, one `worker train` process).
    pub generations: usize,
    /// Generations after the first: restarts of its ranks (a lost, failed
    /// or admitted host, a coordinator restart) and retried attempts.
    pub restarts: usize,
    /// The world size of each recorded generation, joined by spaces (`2 1
    /// 2`); empty when none is recorded.
    pub world_sizes: String,
    /// Whether the world size differs between generations (the data
    /// streams were mapped onto other ranks).
    pub world_size_changed: bool,
}

/// The [`RunRow`]s of a sweep's finished runs, in manifest order.
pub fn run_rows(sweep: &Sweep) -> Vec<RunRow> {
    sweep
        .runs
        .iter()
        .map(|run| RunRow {
            id: run.cell.id.clone(),
            seed: run.cell.seed,
            val_top1: run.finals.get(VAL).copied(),
            generations: run.generations.count(),
            restarts: run.generations.restarts(),
            world_sizes: run
                .generations
                .world_sizes()
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            world_size_changed: run.generations.world_size_changed(),
        })
        .collect()
}

/// The finished runs in Markdown, one row each: id, seed, final top-1 per
/// eval set of `sets` (two decimals), restarts and world sizes per generation.
pub fn run_table_markdown(sweep: &Sweep, sets: &[String]) -> String {
    let header: Vec<String> = sets.iter().map(|s| format!("{} top-1", display_name(s))).collect();
    let mut out = format!(
        "| run | seed | {} | restarts | world size |\n|---|---|{}---|---|\n",
        header.join(" | "),
        "---|".repeat(sets.len())
    );
    for run in &sweep.runs {
        let finals: Vec<String> =
            sets.iter().map(|set| opt(run.finals.get(set).copied(), 2)).collect();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            run.cell.id,
            run.cell.seed,
            finals.join(" | "),
            run.generations.restarts(),
            run.generations.world_sizes_text()
        );
    }
    out
}

/// One line of `grid.csv`: one value of one grid axis (or one combination
/// of every axis), over the seeds and the other axes' values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridRow {
    /// The axis key, or every key joined by ` × ` for a combination.
    pub axis: String,
    /// Its value (values joined by ` × ` for a combination).
    pub value: String,
    /// Eval set.
    pub set: String,
    /// Finished runs with this value.
    pub n: usize,
    /// Mean final top-1.
    pub mean: f64,
    /// Sample standard deviation over those runs; empty for one run.
    pub std: Option<f64>,
}

/// The [`GridRow`]s: every value of every axis, then (with two or more axes)
/// every combination, for every eval set.
pub fn grid_rows(sweep: &Sweep) -> Vec<GridRow> {
    let grid = &sweep.manifest.grid;
    let mut groups: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for axis in grid {
        for value in &axis.values {
            groups.push((axis.key.clone(), vec![(axis.key.clone(), value.clone())]));
        }
    }
    if grid.len() >= 2 {
        let axis = grid.iter().map(|a| a.key.as_str()).collect::<Vec<_>>().join(" × ");
        let mut combos: Vec<Vec<(String, String)>> = Vec::new();
        for cell in &sweep.manifest.cells {
            let combo: Vec<(String, String)> =
                cell.assignments.iter().map(|a| (a.key.clone(), a.value.clone())).collect();
            if !combos.contains(&combo) {
                combos.push(combo);
            }
        }
        groups.extend(combos.into_iter().map(|c| (axis.clone(), c)));
    }
    let mut rows = Vec::new();
    for set in sweep.sets() {
        for (axis, wanted) in &groups {
            let values: Vec<f64> = sweep
                .runs
                .iter()
                .filter(|r| wanted.iter().all(|(k, v)| r.cell.value_of(k) == Some(v.as_str())))
                .filter_map(|r| r.finals.get(&set).copied())
                .collect();
            let Some(s) = Summary::of(&values) else { continue };
            rows.push(GridRow {
                axis: axis.clone(),
                value: wanted.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join(" × "),
                set: set.clone(),
                n: s.n,
                mean: s.mean,
                std: s.std,
            });
        }
    }
    rows
}

/// The grid tables in Markdown: per axis (and the combinations), one row
/// per value, one `mean ± std (n)` column per eval set.
pub fn grid_markdown(rows: &[GridRow], sets: &[String]) -> String {
    let mut out = String::new();
    let mut axes: Vec<&str> = Vec::new();
    for r in rows {
        if !axes.contains(&r.axis.as_str()) {
            axes.push(&r.axis);
        }
    }
    for axis in axes {
        let _ = writeln!(out, "\n#### {axis}\n");
        let header: Vec<String> =
            sets.iter().map(|s| format!("{} top-1", display_name(s))).collect();
        let _ = writeln!(out, "| value | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(sets.len()));
        let mut values: Vec<&str> = Vec::new();
        for r in rows.iter().filter(|r| r.axis == axis) {
            if !values.contains(&r.value.as_str()) {
                values.push(&r.value);
            }
        }
        for value in values {
            let cells: Vec<String> = sets
                .iter()
                .map(|set| {
                    rows.iter()
                        .find(|r| r.axis == axis && r.value == value && &r.set == set)
                        .map_or_else(
                            || "—".into(),
                            |r| match r.std {
                                Some(std) => format!("{:.2} ± {std:.2} (n={})", r.mean, r.n),
                                None => format!("{:.2} (n=1)", r.mean),
                            },
                        )
                })
                .collect();
            let _ = writeln!(out, "| {value} | {} |", cells.join(" | "));
        }
    }
    out
}

/// One line of `comparison.csv`: sweep B against sweep A on one eval set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    /// Eval set.
    pub set: String,
    /// Runs of A.
    pub n_a: usize,
    /// Mean of A.
    pub mean_a: f64,
    /// Sample std of A.
    pub std_a: Option<f64>,
    /// Runs of B.
    pub n_b: usize,
    /// Mean of B.
    pub mean_b: f64,
    /// Sample std of B.
    pub std_b: Option<f64>,
    /// mean(B) − mean(A), in points of top-1.
    pub difference: f64,
    /// Lower end of its 95% confidence interval (Welch–Satterthwaite).
    pub ci95_low: Option<f64>,
    /// Upper end.
    pub ci95_high: Option<f64>,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: Option<f64>,
    /// Welch's t.
    pub t: Option<f64>,
    /// Two-sided p-value of Welch's t-test.
    pub p_value: Option<f64>,
    /// Whether the 95% interval holds 0 (empty when it cannot be computed).
    pub within_noise: Option<bool>,
    /// Seeds per sweep that resolve a difference of this size (80% power,
    /// two-sided 5%).
    pub seeds_needed: Option<u64>,
    /// Grid cells A's runs come from (1: seeds alone).
    pub grid_cells_a: usize,
    /// Grid cells B's runs come from.
    pub grid_cells_b: usize,
}

impl ComparisonRow {
    /// Whether a sweep pools runs of several grid cells: their spread is
    /// not seed noise alone, and no test against seed noise is made.
    pub fn pools_grid_cells(&self) -> bool {
        self.grid_cells_a > 1 || self.grid_cells_b > 1
    }
}

/// The [`ComparisonRow`]s of the eval sets both sweeps have.
pub fn comparison_rows(a: &Sweep, b: &Sweep) -> Vec<ComparisonRow> {
    a.sets()
        .into_iter()
        .filter_map(|set| {
            let sa = Summary::of(&a.finals(&set))?;
            let sb = Summary::of(&b.finals(&set))?;
            let (grid_cells_a, grid_cells_b) = (a.grid_cells(&set), b.grid_cells(&set));
            let seed_noise_alone = grid_cells_a == 1 && grid_cells_b == 1;
            let w = stats::welch(&sa, &sb).filter(|_| seed_noise_alone);
            let difference = sb.mean - sa.mean;
            Some(ComparisonRow {
                n_a: sa.n,
                mean_a: sa.mean,
                std_a: sa.std,
                n_b: sb.n,
                mean_b: sb.mean,
                std_b: sb.std,
                difference,
                ci95_low: w.map(|w| w.ci95.0),
                ci95_high: w.map(|w| w.ci95.1),
                df: w.map(|w| w.df),
                t: w.map(|w| w.t),
                p_value: w.map(|w| w.p_value),
                within_noise: w.map(|w| w.within_noise()),
                seeds_needed: stats::seeds_needed(&sa, &sb, difference)
                    .filter(|_| seed_noise_alone),
                grid_cells_a,
                grid_cells_b,
                set,
            })
        })
        .collect()
}

fn signed(v: f64) -> String {
    format!("{v:+.2}")
}

fn p_text(p: f64) -> String {
    if p < 1e-3 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// The plain sentence of one comparison row.
pub fn comparison_sentence(row: &ComparisonRow, name_a: &str, name_b: &str) -> String {
    let set = display_name(&row.set);
    let head = format!(
        "{set}: {name_b} − {name_a} = {} points of top-1 ({:.2} vs {:.2}",
        signed(row.difference),
        row.mean_b,
        row.mean_a
    );
    if row.pools_grid_cells() {
        return format!(
            "{head}): not compared with seed noise, since a sweep pools the runs of several \
             grid cells ({name_a}: {}, {name_b}: {}), whose spread is not seed noise alone; \
             compare sweeps of one cell each).",
            row.grid_cells_a, row.grid_cells_b
        );
    }
    let (Some(lo), Some(hi), Some(p), Some(within)) =
        (row.ci95_low, row.ci95_high, row.p_value, row.within_noise)
    else {
        return format!(
            "{head}): cannot be compared with seed noise (each sweep needs at least two \
             finished runs with some spread; they have {} and {}).",
            row.n_a, row.n_b
        );
    };
    let numbers = format!(
        "{head}; 95% CI {} to {}, Welch's t-test p = {})",
        signed(lo),
        signed(hi),
        p_text(p)
    );
    let seeds = match row.seeds_needed {
        Some(n) => format!(
            "about {n} seeds per sweep would resolve a difference of this size \
             (80% power, two-sided 5%; these sweeps have {} and {})",
            row.n_a, row.n_b
        ),
        None => "no number of seeds resolves a difference of exactly zero".into(),
    };
    if within {
        format!("{numbers}: within seed noise, no evidence of a difference; {seeds}.")
    } else {
        let better = if row.difference > 0.0 { name_b } else { name_a };
        format!("{numbers}: outside seed noise, {better} is better; {seeds}.")
    }
}

/// The comparison in Markdown: a table and one sentence per eval set.
pub fn comparison_markdown(rows: &[ComparisonRow], name_a: &str, name_b: &str) -> String {
    let mut out = format!(
        "| set | {name_a} mean ± std (n) | {name_b} mean ± std (n) | difference | 95% CI | \
         Welch p | seeds needed |\n|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let ci = match (r.ci95_low, r.ci95_high) {
            (Some(lo), Some(hi)) => format!("{} – {}", signed(lo), signed(hi)),
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} ± {} ({}) | {:.2} ± {} ({}) | {} | {} | {} | {} |",
            display_name(&r.set),
            r.mean_a,
            opt(r.std_a, 2),
            r.n_a,
            r.mean_b,
            opt(r.std_b, 2),
            r.n_b,
            signed(r.difference),
            ci,
            r.p_value.map_or_else(|| "—".into(), p_text),
            r.seeds_needed.map_or_else(|| "—".into(), |n| n.to_string()),
        );
    }
    out.push('\n');
    for r in rows {
        let _ = writeln!(out, "- {}", comparison_sentence(r, name_a, name_b));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, difference: f64, p: Option<f64>) -> ComparisonRow {
        ComparisonRow {
            set: "v2".into(),
            n_a: n,
            mean_a: 68.0,
            std_a: None,
            n_b: n,
            mean_b: 68.0 + difference,
            std_b: None,
            difference,
            ci95_low: p.map(|_| difference - 0.3),
            ci95_high: p.map(|_| difference + 0.3),
            df: p.map(|_| 10.0),
            t: p.map(|_| 1.0),
            p_value: p,
            within_noise: p.map(|p| p >= 0.05),
            seeds_needed: p.map(|_| 40),
            grid_cells_a: 1,
            grid_cells_b: 1,
        }
    }

    #[test]
    fn the_sentence_says_noise_difference_or_not_comparable() {
        let within = comparison_sentence(&row(10, 0.1, Some(0.4)), "a2", "b");
        assert!(within.starts_with("V2: b − a2 = +0.10 points"), "{within}");
        assert!(
            within.contains("within seed noise") && within.contains("about 40 seeds"),
            "{within}"
        );
        let outside = comparison_sentence(&row(10, -0.5, Some(0.0001)), "a2", "b");
        assert!(outside.contains("outside seed noise, a2 is better"), "{outside}");
        assert!(outside.contains("p = 1.0e-4"), "{outside}");
        let single = comparison_sentence(&row(1, 0.2, None), "a2", "b");
        assert!(single.contains("cannot be compared with seed noise"), "{single}");
    }
}
