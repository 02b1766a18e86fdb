//! `keel cert`: a cluster CA and the certificates nodes and clients present (`keel dev` makes
//! its own with the same code). A node certificate carries the URI SAN `keel://node/N` that peers
//! check against the node id a request claims; a client certificate's common name is its
//! principal.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// `keel cert …`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a CA (`ca.pem`, `ca.key`) in DIR; refuses to overwrite one.
    Ca {
        /// Where to write it.
        #[arg(long, default_value = "keel-tls")]
        dir: PathBuf,
    },
    /// Issue node N's certificate (`node-N.pem`, `node-N.key`) from the CA in DIR, valid for
    /// the given host names and IP addresses (those peers and clients dial it at).
    Node {
        /// The node id it proves.
        #[arg(long)]
        id: u64,
        /// Host names and IP addresses, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        hosts: Vec<String>,
        #[arg(long, default_value = "keel-tls")]
        dir: PathBuf,
    },
    /// Issue a client certificate (`client-NAME.pem`, `.key`) whose principal is NAME.
    Client {
        /// The principal (the certificate's common name).
        name: String,
        #[arg(long, default_value = "keel-tls")]
        dir: PathBuf,
    },
}

/// Runs a `keel cert` command.
pub fn run(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Ca { dir } => {
            if dir.join("ca.pem").exists() {
                bail!("{} already holds a CA (ca.pem); remove it to make another", dir.display());
            }
            create_ca(&dir)?;
            println!("{}", dir.join("ca.pem").display());
        }
        CertCommand::Node { id, hosts, dir } => {
            let (cert, key) = issue_node(&dir, id, &hosts)?;
            println!("{}\n{}", cert.display(), key.display());
        }
        CertCommand::Client { name, dir } => {
            let (cert, key) = issue_client(&dir, &name)?;
            println!("{}\n{}", cert.display(), key.display());
        }
    }
    Ok(())
}

/// Writes a secret file (mode 0600).
pub fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    write(path, contents, true)
}

fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Creates a CA in `dir` (`ca.pem`, `ca.key`).
pub fn create_ca(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Keel cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
    write(&dir.join("ca.pem"), &cert.pem(), false)
}

fn load_ca(dir: &Path) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (make a CA with `keel cert ca`)", path.display()))
    };
    let key = KeyPair::from_pem(&read("ca.key")?).context("ca.key")?;
    // Re-signing the same name and key gives a certificate that verifies what the original issued.
    let cert = CertificateParams::from_ca_cert_pem(&read("ca.pem")?).context("ca.pem")?.self_signed(&key)?;
    Ok((cert, key))
}

fn issue(dir: &Path, name: &str, mut params: CertificateParams) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (ca, ca_key) = load_ca(dir)?;
    let key = KeyPair::generate()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

/// Issues node `id`'s certificate for `hosts` from the CA in `dir`.
pub fn issue_node(dir: &Path, id: u64, hosts: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    if id == 0 {
        bail!("node ids start at 1");
    }
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, format!("keel node {id}"));
    params.subject_alt_names.push(SanType::URI(format!("{}{id}", keel_broker::tls::NODE_URI_PREFIX).try_into()?));
    for host in hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
        params.subject_alt_names.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.to_owned().try_into()?),
        });
    }
    // Its own listeners (server) and its calls to peers (client).
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, &format!("node-{id}"), params)
}

/// Issues a client certificate for principal `name` from the CA in `dir`.
pub fn issue_client(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        bail!("a principal name is letters, digits and - _ . @");
    }
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, &format!("client-{name}"), params)
}
