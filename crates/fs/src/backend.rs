//! The vhost-user side: QEMU hands over the guest's memory and the
//! virtqueues; each request on a queue is one FUSE message, answered by the
//! fuse-backend-rs [`Server`] over the guarded file system.
//!
//! Requests are handled one at a time on the queue's thread (virtiofsd's
//! default too): the guest has one request queue and one or two vCPUs.

use std::io;
use std::sync::{Arc, Mutex};

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
/// Largest queue QEMU may configure.
const QUEUE_SIZE: usize = 1024;

struct State {
    mem: Option<Mem>,
    event_idx: bool,
}

/// One share's vhost-user-fs device.
pub struct FsBackend<F: FileSystem + Send + Sync> {
    server: Arc<Server<Arc<F>>>,
    state: Mutex<State>,
}

impl<F: FileSystem + Send + Sync> FsBackend<F> {
    pub fn new(fs: Arc<F>) -> Self {
        FsBackend {
            server: Arc::new(Server::new(fs)),
            state: Mutex::new(State {
                mem: None,
                event_idx: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers every request waiting on the queue. Returns whether any was.
    fn process(&self, vring: &mut VringState<Mem>, mem: &Mem) -> io::Result<bool> {
        let guard = mem.memory();
        let chains: Vec<_> = vring
            .get_queue_mut()
            .iter(guard.clone())
            .map_err(|e| io::Error::other(format!("reading the queue: {e}")))?
            .collect();
        let mut any = false;
        for chain in chains {
            any = true;
            let head = chain.head_index();
            let len = match self.answer(&guard, chain) {
                Ok(n) => n,
                Err(e) => {
                    // A malformed request from the guest: it gets nothing back
                    // for it, the server goes on.
                    tracing::debug!("a request failed: {e}");
                    0
                }
            };
            vring
                .add_used(head, len as u32)
                .map_err(|e| io::Error::other(format!("returning a descriptor: {e}")))?;
        }
        Ok(any)
    }

    fn answer(
        &self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>>,
    ) -> io::Result<usize> {
        let reader = Reader::from_descriptor_chain(mem, chain.clone())
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        let writer = VirtioFsWriter::new(mem, chain)
            .map(Writer::VirtioFs)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.server
            .handle_message(reader, writer, None, None)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }
}

impl<F: FileSystem + Send + Sync + 'static> VhostUserBackend for FsBackend<F> {
    type Bitmap = ();
    type Vring = VringMutex<Mem>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state().event_idx = enabled;
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.state().mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex<Mem>],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event on a queue"));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        let (mem, event_idx) = {
            let s = self.state();
            let mem = s
                .mem
                .clone()
                .ok_or_else(|| io::Error::other("a queue event before the guest memory"))?;
            (mem, s.event_idx)
        };
        let mut state = vring.get_mut();
        if event_idx {
            // The queue is read once per call: keep going until no request
            // arrived while notifications were off.
            loop {
                state
                    .disable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                self.process(&mut state, &mem)?;
                if !state
                    .enable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?
                {
                    break;
                }
            }
            if state
                .needs_notification()
                .map_err(|e| io::Error::other(e.to_string()))?
            {
                state.signal_used_queue()?;
            }
        } else if self.process(&mut state, &mem)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }
}
