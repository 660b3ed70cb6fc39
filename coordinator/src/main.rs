//! `coordinator`: schedules data-parallel training across worker hosts. It
//! never links libtorch or CUDA, so it runs on any small CPU node.

use anyhow::Result;
use clap::{Parser, Subcommand};
use rsb_coordinator::plan::BatchPlan;
use std::path::PathBuf;

/// Plan and coordinate ResNet-strikes-back training runs over worker hosts.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show how a recipe's global batch splits over a number of ranks.
    Plan {
        /// Recipe YAML file.
        #[arg(long)]
        recipe: PathBuf,
        /// Override a recipe field (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Data-parallel ranks (GPUs in all).
        #[arg(long)]
        ranks: u32,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Plan { recipe, overrides, ranks } => {
            let recipe = rsb_recipes::load(&recipe, &overrides)?;
            let plan = BatchPlan::new(&recipe, ranks)?;
            println!(
                "{}: global batch {} = micro-batch {} x {} accumulation step(s) x {} rank(s)",
                recipe.name, plan.global_size, plan.micro_size, plan.accumulation, plan.world_size
            );
            for rank in 0..ranks {
                println!("  rank {rank}: sampler streams {:?}", plan.streams_of(rank));
            }
            Ok(())
        }
    }
}
