//! Certificates for a throwaway cluster: one CA signs the API server's serving
//! certificate, an admin client certificate and the real node's client certificate; a
//! separate key signs service-account tokens.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// PEM files written into the cluster directory.
#[derive(Debug)]
pub struct Pki {
    pub ca_cert: String,
    pub admin_cert: String,
    pub admin_key: String,
}

pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "switchyard-local-ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        // The real node's bridge address and the `kubernetes` Service's address, by which
        // pods reach the API server.
        crate::node::NODE_IP.to_owned(),
        "10.96.0.1".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    let serving_cert = serving.signed_by(&serving_key, &ca)?;

    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin
        .distinguished_name
        .push(DnType::CommonName, "switchyard-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    let admin_cert = admin.signed_by(&admin_key, &ca)?;

    // The kubelet's identity: the Node authorizer and NodeRestriction key on it.
    let mut node = CertificateParams::new(Vec::<String>::new())?;
    node.distinguished_name.push(
        DnType::CommonName,
        format!("system:node:{}", crate::node::NODE_NAME),
    );
    node.distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let node_key = KeyPair::generate()?;
    let node_cert = node.signed_by(&node_key, &ca)?;

    let sa_key = KeyPair::generate()?;

    let pki = Pki {
        ca_cert: ca.pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
    };
    let files = [
        ("ca.crt", pki.ca_cert.clone()),
        ("ca.key", ca.key().serialize_pem()),
        ("apiserver.crt", serving_cert.pem()),
        ("apiserver.key", serving_key.serialize_pem()),
        ("admin.crt", pki.admin_cert.clone()),
        ("admin.key", pki.admin_key.clone()),
        ("node.crt", node_cert.pem()),
        ("node.key", node_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
    ];
    for (name, pem) in files {
        std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
    }
    Ok(pki)
}
