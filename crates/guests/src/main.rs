//! `nestvm-guest`: writes a tiny test guest to a file, for the lab and benchmarks.
//!
//! Usage: `nestvm-guest OUT hello MESSAGE ENDING` or
//! `nestvm-guest OUT io-loop PORT COUNT MESSAGE ENDING`, where ENDING is one
//! of reset, poweroff, triple-fault, halt.

use nestvm_guests::{hello, io_loop, Ending};

fn ending(s: &str) -> Result<Ending, String> {
    Ok(match s {
        "reset" => Ending::Reset,
        "poweroff" => Ending::PowerOff,
        "triple-fault" => Ending::TripleFault,
        "halt" => Ending::HaltForever,
        other => {
            return Err(format!(
                "unknown ending '{other}' (reset, poweroff, triple-fault, halt)"
            ))
        }
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let image = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [_, "hello", msg, end] => ending(end).map(|e| hello(msg, e)),
        [_, "io-loop", port, count, msg, end] => match (port.parse::<u8>(), count.parse::<u32>()) {
            (Ok(p), Ok(c)) => ending(end).map(|e| io_loop(p, c, msg, e)),
            _ => Err("PORT is 0-255 and COUNT a number".to_owned()),
        },
        _ => Err("usage: nestvm-guest OUT hello MESSAGE ENDING | nestvm-guest OUT io-loop PORT COUNT MESSAGE ENDING".to_owned()),
    };
    match image.and_then(|img| {
        std::fs::write(&args[0], img).map_err(|e| format!("cannot write {}: {e}", args[0]))
    }) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("nestvm-guest: {e}");
            std::process::exit(2);
        }
    }
}
