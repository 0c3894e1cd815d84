//! The job as the agent checks it before doing anything: a version it speaks, a registry
//! it can name images in, a deadline it can read; and which of its values are secrets that
//! no event may carry.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::protocol::{Job, JobProject, VERSION};
use crate::registry::auth::Basic;
use crate::registry::{RegistryError, RegistryRef};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to read the job: unsupported version {0} (this agent speaks {VERSION})")]
    Version(u32),
    #[error("failed to read the job")]
    Registry(#[source] RegistryError),
    #[error("failed to read the job: deadline `{deadline}`")]
    Deadline {
        deadline: String,
        #[source]
        source: humantime::TimestampError,
    },
    #[error("failed to prepare {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The events file could not be written: the job was stopped, since nobody could see
    /// or resume what followed.
    #[error("{0}; the job was stopped")]
    EventsLost(String),
}

impl AgentError {
    /// The job itself was unusable (rather than this machine failing it).
    pub fn is_invalid_job(&self) -> bool {
        !matches!(self, AgentError::Io { .. } | AgentError::EventsLost(_))
    }
}

/// A job that passed the checks, with what the steps derive from it.
#[derive(Debug)]
pub struct CheckedJob {
    pub job: Job,
    pub registry: RegistryRef,
    pub deadline: Option<SystemTime>,
    /// Where the commit's files are checked out.
    pub src: PathBuf,
}

impl CheckedJob {
    pub fn check(job: Job) -> Result<CheckedJob, AgentError> {
        if job.v != VERSION {
            return Err(AgentError::Version(job.v));
        }
        let registry = RegistryRef::parse(&job.registry.url).map_err(AgentError::Registry)?;
        let deadline = match &job.deadline {
            Some(d) => Some(humantime::parse_rfc3339_weak(d).map_err(|source| AgentError::Deadline {
                deadline: d.clone(),
                source,
            })?),
            None => None,
        };
        Ok(CheckedJob {
            src: job.workdir.join("src"),
            job,
            registry,
            deadline,
        })
    }

    /// `host/repository` of a project's images.
    pub fn repo(&self, project: &str) -> String {
        format!("{}/{}", self.registry.host, self.registry.repository(project))
    }

    /// A project's image with `tag`, in the job's own namespace.
    pub fn image(&self, project: &str, tag: &str) -> String {
        format!("{}:{tag}", self.repo(project))
    }

    /// Where `p`'s existing image is: where the plan found it (another namespace), else
    /// the job's own.
    pub fn existing(&self, p: &JobProject) -> String {
        p.image.clone().unwrap_or_else(|| self.image(&p.name, &p.tag))
    }

    /// The repository (without the host) holding `p`'s existing image.
    pub fn existing_repository(&self, p: &JobProject) -> String {
        match &p.image {
            Some(image) => {
                let path = image.strip_prefix(&format!("{}/", self.registry.host)).unwrap_or(image);
                path.rsplit_once(':').map(|(repo, _)| repo).unwrap_or(path).to_string()
            }
            None => self.registry.repository(&p.name),
        }
    }

    /// The trusted namespace's `host/repository` of a project, for an untrusted job.
    pub fn trusted_repo(&self, project: &str) -> Option<String> {
        let url = self.job.registry.trusted.as_deref()?;
        let r = RegistryRef::parse(url).ok()?;
        Some(format!("{}/{}", r.host, r.repository(project)))
    }

    /// The branch this build is of (the main branch when the job names none).
    pub fn branch(&self) -> &str {
        self.job.branch.as_deref().unwrap_or(&self.job.main_branch)
    }

    /// Only builds and tests need docker; a job of commands alone runs without it.
    pub fn needs_docker(&self) -> bool {
        self.job.projects.iter().any(|p| p.build || !p.tests.is_empty())
    }

    /// What every event is redacted of: the registry password, and the basic credential
    /// made of it (which docker and registries echo back).
    pub fn secrets(&self) -> Vec<String> {
        let reg = &self.job.registry;
        let Some(password) = reg.password.as_ref().filter(|p| !p.is_empty()) else {
            return Vec::new();
        };
        let mut secrets = vec![password.clone()];
        if let Some(username) = &reg.username {
            let basic = Basic {
                username: username.clone(),
                password: password.clone(),
            };
            secrets.push(basic.header().trim_start_matches("Basic ").to_string());
        }
        secrets
    }
}
