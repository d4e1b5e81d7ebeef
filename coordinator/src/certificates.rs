//! Agent certificates, two ways. By CSR (spec 4.G.38): an agent sends a
//! PKCS#10 request in `connection_settings_request`; the server signs it with
//! its tenant's issuing CA and answers with the certificate and that CA in
//! `connection_settings.opamp.certificate` (the private key never leaves the
//! agent). Server-generated (spec 4.G.36, on an operator's request, to issue
//! or rotate): the server makes a key pair and a certificate and offers both;
//! the record keeps the private key only until the agent proves it holds it
//! by connecting with the certificate. With the same CA among the gateways'
//! client CAs for the tenant (`[tls] client_cas`), the agent's next
//! connection is recognised by it.
//!
//! The policy is fixed and strict: the subject is replaced by
//! `CN=<the agent's uid>, O=<tenant>` (a CSR that names another agent is
//! refused, spec 4.B.13), requested extensions are dropped, the certificate
//! is a client certificate (digital signature, client auth), never a CA, and
//! lives `lifetime` (agents may ask again before it ends).

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use fleetplane_proto::{InstanceUid, TenantId, credentials::certificate_id, opamp::TlsCertificate};
use rcgen::{
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

/// Why a CSR was not signed (answered to the agent as BadRequest).
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("this control plane issues no certificates for tenant {0}")]
    NoIssuer(TenantId),
    #[error("the CSR is not a PEM PKCS#10 request Fleetplane can read: {0}")]
    Unreadable(String),
    #[error("the CSR names {named:?}, not this agent ({uid})")]
    OtherAgent { named: String, uid: InstanceUid },
    #[error("could not sign: {0}")]
    Signing(String),
    #[error("cannot load issuer for tenant {tenant}: {reason}")]
    Load { tenant: String, reason: String },
}

/// One tenant's issuing CA.
struct TenantIssuer {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

/// The issuing CAs, by tenant.
#[derive(Clone, Default)]
pub struct Issuers {
    by_tenant: Arc<HashMap<TenantId, TenantIssuer>>,
    lifetime: Duration,
}

impl std::fmt::Debug for Issuers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuers")
            .field("tenants", &self.by_tenant.keys().collect::<Vec<_>>())
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Issuers {
    /// Loads each tenant's CA certificate and key (PEM files).
    pub fn load(specs: &[(TenantId, &Path, &Path)], lifetime: Duration) -> Result<Self, CertificateError> {
        let mut by_tenant = HashMap::new();
        for (tenant, cert_file, key_file) in specs {
            let load = |e: String| CertificateError::Load {
                tenant: tenant.to_string(),
                reason: e,
            };
            let ca_pem =
                std::fs::read_to_string(cert_file).map_err(|e| load(format!("{}: {e}", cert_file.display())))?;
            let key_pem =
                std::fs::read_to_string(key_file).map_err(|e| load(format!("{}: {e}", key_file.display())))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| load(format!("{}: {e}", key_file.display())))?;
            let issuer =
                Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| load(format!("{}: {e}", cert_file.display())))?;
            by_tenant.insert(tenant.clone(), TenantIssuer { issuer, ca_pem });
        }
        Ok(Self {
            by_tenant: Arc::new(by_tenant),
            lifetime,
        })
    }

    /// Whether this tenant's agents may send CSRs (then the server
    /// advertises AcceptsConnectionSettingsRequest to them).
    pub fn issues_for(&self, tenant: &str) -> bool {
        TenantId::new(tenant.to_owned()).is_ok_and(|t| self.by_tenant.contains_key(&t))
    }

    /// Signs `csr_pem` for agent `uid` of `tenant`: the certificate for the
    /// agent, and its identity ([`certificate_id`]).
    pub fn sign(
        &self,
        tenant: &TenantId,
        uid: &InstanceUid,
        csr_pem: &[u8],
    ) -> Result<(TlsCertificate, String), CertificateError> {
        let issuer = self
            .by_tenant
            .get(tenant)
            .ok_or_else(|| CertificateError::NoIssuer(tenant.clone()))?;
        let text = std::str::from_utf8(csr_pem).map_err(|_| CertificateError::Unreadable("not UTF-8 PEM".into()))?;
        let mut csr =
            CertificateSigningRequestParams::from_pem(text).map_err(|e| CertificateError::Unreadable(e.to_string()))?;
        if let Some(named) = common_name(&csr.params.distinguished_name)
            && !names_agent(&named, uid)
        {
            return Err(CertificateError::OtherAgent { named, uid: *uid });
        }
        self.apply_policy(&mut csr.params, tenant, uid);
        let certificate = csr
            .signed_by(&issuer.issuer)
            .map_err(|e| CertificateError::Signing(e.to_string()))?;
        let id = certificate_id(certificate.der());
        Ok((
            TlsCertificate {
                cert: certificate.pem().into_bytes(),
                private_key: Vec::new(),
                ca_cert: issuer.ca_pem.clone().into_bytes(),
            },
            id,
        ))
    }

    /// Makes a key pair and a certificate for agent `uid` of `tenant`
    /// (server-generated flow): the certificate with its private key and
    /// the CA, and its identity ([`certificate_id`]).
    pub fn issue(&self, tenant: &TenantId, uid: &InstanceUid) -> Result<(TlsCertificate, String), CertificateError> {
        let issuer = self
            .by_tenant
            .get(tenant)
            .ok_or_else(|| CertificateError::NoIssuer(tenant.clone()))?;
        let key = KeyPair::generate().map_err(|e| CertificateError::Signing(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        self.apply_policy(&mut params, tenant, uid);
        let certificate = params
            .signed_by(&key, &issuer.issuer)
            .map_err(|e| CertificateError::Signing(e.to_string()))?;
        let id = certificate_id(certificate.der());
        Ok((
            TlsCertificate {
                cert: certificate.pem().into_bytes(),
                private_key: key.serialize_pem().into_bytes(),
                ca_cert: issuer.ca_pem.clone().into_bytes(),
            },
            id,
        ))
    }

    /// The one policy of every certificate issued: the subject names the
    /// agent and its tenant, nothing the requester asked for survives, a
    /// client certificate that is never a CA, for `lifetime`.
    fn apply_policy(&self, params: &mut rcgen::CertificateParams, tenant: &TenantId, uid: &InstanceUid) {
        let now = time::OffsetDateTime::now_utc();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, uid.to_uuid_string());
        subject.push(DnType::OrganizationName, tenant.as_str());
        params.distinguished_name = subject;
        params.subject_alt_names.clear();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.custom_extensions.clear();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after =
            now + time::Duration::seconds(i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX / 2));
        params.serial_number = Some(SerialNumber::from_slice(InstanceUid::new_v7().as_bytes()));
    }
}

fn common_name(dn: &DistinguishedName) -> Option<String> {
    dn.get(&DnType::CommonName).map(|value| match value {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    })
}

/// A CN names this agent when it is its uid, as hex or in UUID form.
fn names_agent(named: &str, uid: &InstanceUid) -> bool {
    InstanceUid::parse(named.trim()).is_ok_and(|n| n == *uid)
}
