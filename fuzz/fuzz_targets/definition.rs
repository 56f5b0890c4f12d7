//! A VM's definition as a hostile file or flag would give it: the TOML
//! form, and the `--disk`, `--net`, `--balloon` and size flags. A definition
//! that is accepted is valid, and writing it back and reading it again
//! gives the same definition; nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_config::adapters::{parse_balloon, parse_disk, parse_net};
use nestvm_config::{parse_size, Overrides, VmConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines().take(8) {
        let _ = parse_size(line);
        let _ = parse_disk(line);
        let _ = parse_net(line);
        let _ = parse_balloon(line);
    }
    let dir = std::env::temp_dir().join(format!("nestvm-fuzz-definition-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join("vm.toml");
    if std::fs::write(&file, text).is_err() {
        return;
    }
    let Ok(config) = VmConfig::resolve(Some(&file), Overrides::default()) else {
        return;
    };
    config.validate().expect("an accepted definition is valid");
    let again = config
        .to_toml()
        .expect("an accepted definition can be written");
    std::fs::write(&file, again).unwrap();
    let back = VmConfig::resolve(Some(&file), Overrides::default()).expect("read back");
    assert_eq!(back, config);
});
