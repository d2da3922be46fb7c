//! Two builds of one program against one cluster. The edit–rebuild–rerun
//! loop leaves workers of the old build running; a task sent to them would
//! run the old code. Workers serve only clients of their own build, so the
//! new build gets an error naming both builds instead of a wrong value.
//!
//! ```text
//! target/debug/rask-scheduler --port 0            # prints tcp://127.0.0.1:PORT
//! RASK_EXAMPLE_VARIANT=old cargo build --example build_identity
//! cp target/debug/examples/build_identity /tmp/old-build
//! RASK_WORKER=tcp://127.0.0.1:PORT /tmp/old-build &     # a worker of the old build
//! cargo build --example build_identity            # the new build
//! RASK_SCHEDULER=tcp://127.0.0.1:PORT target/debug/examples/build_identity
//! # error: task scale-… failed: no worker runs this program's build: client …, workers … (1); start workers of this build, …
//! ```

use std::process::ExitCode;

use rask::prelude::*;

/// The function being edited: the build made with `RASK_EXAMPLE_VARIANT`
/// set is the old version.
#[rask::task]
fn scale(x: i64) -> i64 {
    match option_env!("RASK_EXAMPLE_VARIANT") {
        Some(_) => x + 1,
        None => x * 1000,
    }
}

fn main() -> ExitCode {
    // In a worker process (`RASK_WORKER` set) this runs the worker.
    rask::init();
    match delayed!(scale(41)).compute() {
        Ok(value) => {
            println!("scale(41) = {value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
