use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_driver::{Desc, DriverQueue, DESC_NEXT, DESC_WRITE};

const SIZE: u16 = 16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn queue(mem: &GuestMemoryMmap, event_idx: bool) -> (DriverQueue, Queue) {
    DriverQueue::standalone(mem, 0, SIZE, event_idx)
}

/// Whether `irq` was raised since the last call, and lowers it.
fn raised(irq: &Interrupt) -> bool {
    let up = irq.status() & crate::virtio::INT_VRING != 0;
    irq.ack(crate::virtio::INT_VRING);
    up
}

#[test]
fn a_ring_takes_chains_in_order_and_hands_its_position_back() {
    let mem = memory();
    let (mut driver, mut q) = queue(&mem, true);
    let irq = Interrupt::new().unwrap();
    driver.add_chain(&mem, &[(0x8000, 16, false)]);
    driver.add_chain(&mem, &[(0x9000, 16, false), (0xa000, 512, true)]);
    driver.add_chain(
        &mem,
        &[(0xb000, 1, false), (0xc000, 2, true), (0xd000, 3, true)],
    );

    let mut ring = Ring::new(&mem, &q).unwrap();
    let mut seen = Vec::new();
    while let Some(head) = ring.pop().unwrap() {
        let chain: Vec<_> = ring
            .chain(head)
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        let written = chain.iter().filter(|d| d.2).map(|d| d.1).sum();
        ring.add_used(head, written).unwrap();
        seen.push(chain);
    }
    ring.finish(&mut q, &irq).unwrap();

    assert_eq!(
        seen,
        vec![
            vec![(0x8000, 16, false)],
            vec![(0x9000, 16, false), (0xa000, 512, true)],
            vec![(0xb000, 1, false), (0xc000, 2, true), (0xd000, 3, true)],
        ]
    );
    assert_eq!((q.next_avail(), q.next_used()), (3, 3));
    assert_eq!(driver.take_used(&mem), vec![(0, 0), (1, 512), (3, 5)]);
    assert!(
        raised(&irq),
        "the driver asked for an interrupt at the first used chain"
    );

    // The next run starts where this one stopped.
    driver.add_chain(&mem, &[(0xe000, 8, true)]);
    let mut ring = Ring::new(&mem, &q).unwrap();
    assert_eq!(ring.pop().unwrap(), Some(6));
    assert_eq!(ring.pop().unwrap(), None);
    ring.finish(&mut q, &irq).unwrap();
    assert_eq!(q.next_avail(), 4);
    assert!(!raised(&irq), "nothing used, no interrupt");
}

#[test]
fn an_available_index_more_than_a_queue_ahead_is_an_error() {
    let mem = memory();
    let (driver, q) = queue(&mem, true);
    let avail = driver.rings()[1];
    mem.write_obj(SIZE + 1, GuestAddress(avail + 2)).unwrap();
    let mut ring = Ring::new(&mem, &q).unwrap();
    assert_eq!(
        ring.pop(),
        Err(RingError::AvailIndex {
            avail: SIZE + 1,
            next: 0,
            size: SIZE
        })
    );
}

#[test]
fn a_chain_that_loops_ends_after_the_queue_size_of_descriptors() {
    let mem = memory();
    let (mut driver, q) = queue(&mem, true);
    let looping = Desc {
        addr: 0x8000,
        len: 1,
        flags: DESC_NEXT,
        next: 0,
    };
    let head = driver.add_raw(&mem, &[looping]);
    let mut ring = Ring::new(&mem, &q).unwrap();
    assert_eq!(ring.pop().unwrap(), Some(head));
    assert_eq!(ring.chain(head).count(), usize::from(SIZE));
}

#[test]
fn a_chain_ends_at_an_index_outside_the_table() {
    let mem = memory();
    let (mut driver, q) = queue(&mem, true);
    let out = Desc {
        addr: 0x8000,
        len: 1,
        flags: DESC_NEXT,
        next: SIZE,
    };
    let head = driver.add_raw(&mem, &[out]);
    let mut ring = Ring::new(&mem, &q).unwrap();
    assert_eq!(ring.pop().unwrap(), Some(head));
    assert_eq!(ring.chain(head).count(), 1);
    assert_eq!(ring.chain(SIZE).count(), 0, "a head outside the table");
}

#[test]
fn an_indirect_descriptor_ends_the_chain_and_is_reported() {
    let mem = memory();
    let (mut driver, q) = queue(&mem, true);
    let first = Desc {
        addr: 0x8000,
        len: 16,
        flags: DESC_NEXT,
        next: 1,
    };
    let indirect = Desc {
        addr: 0x9000,
        len: 32,
        flags: VRING_DESC_F_INDIRECT as u16,
        next: 0,
    };
    let head = driver.add_raw(&mem, &[first, indirect]);
    let ring = Ring::new(&mem, &q).unwrap();
    let mut chain = ring.chain(head);
    assert_eq!(chain.next().map(|d| d.addr().0), Some(0x8000));
    assert!(!chain.uses_indirect());
    assert!(chain.next().is_none());
    assert!(chain.uses_indirect());
}

#[test]
fn a_chain_ends_before_4_gib_of_buffers() {
    let mem = memory();
    let (mut driver, q) = queue(&mem, true);
    let big = |next| Desc {
        addr: 0x8000,
        len: u32::MAX / 2 + 1,
        flags: DESC_NEXT | DESC_WRITE,
        next,
    };
    let head = driver.add_raw(&mem, &[big(1), big(2), big(3)]);
    let ring = Ring::new(&mem, &q).unwrap();
    assert_eq!(ring.chain(head).count(), 1);
}

/// The interrupt decision matches virtio-queue's for every place of
/// used_event around a run, across the index's wrap: the two take the
/// same state of the same memory.
#[test]
fn the_interrupt_decision_matches_virtio_queue_around_the_wrap() {
    for start in [0u16, 7, 65_530, 65_535] {
        for used in 0..4u16 {
            for offset in -3i32..6 {
                let used_event = (i32::from(start) + offset) as u16;
                let decide = |ours: bool| {
                    let mem = memory();
                    let (driver, mut q) = queue(&mem, true);
                    q.set_next_used(start);
                    driver.set_used_event(&mem, used_event);
                    if ours {
                        let irq = Interrupt::new().unwrap();
                        let mut ring = Ring::new(&mem, &q).unwrap();
                        for _ in 0..used {
                            ring.add_used(0, 0).unwrap();
                        }
                        ring.finish(&mut q, &irq).unwrap();
                        raised(&irq)
                    } else {
                        for _ in 0..used {
                            q.add_used(&mem, 0, 0).unwrap();
                        }
                        used > 0 && q.needs_notification(&mem).unwrap()
                    }
                };
                assert_eq!(
                    decide(true),
                    decide(false),
                    "start {start}, {used} used, used_event {used_event}"
                );
            }
        }
    }
}

#[test]
fn enabling_notifications_sets_avail_event_and_reports_chains_that_came_meanwhile() {
    let mem = memory();
    let (mut driver, q) = queue(&mem, true);
    driver.add_chain(&mem, &[(0x8000, 1, true)]);
    let mut ring = Ring::new(&mem, &q).unwrap();
    ring.disable_notification().unwrap();
    assert!(ring.pop().unwrap().is_some());
    assert!(!ring.enable_notification().unwrap());
    assert_eq!(driver.avail_event(&mem), 1);

    driver.add_chain(&mem, &[(0x9000, 1, true)]);
    assert!(
        ring.enable_notification().unwrap(),
        "a chain came after the ring was emptied"
    );
    assert!(ring.pop().unwrap().is_some());
    assert!(!ring.enable_notification().unwrap());
    assert_eq!(driver.avail_event(&mem), 2);
}

#[test]
fn without_event_idx_the_flags_decide() {
    let mem = memory();
    let (mut driver, mut q) = queue(&mem, false);
    let [_, avail, used] = driver.rings();
    let irq = Interrupt::new().unwrap();
    driver.add_chain(&mem, &[(0x8000, 1, true)]);

    let mut ring = Ring::new(&mem, &q).unwrap();
    ring.disable_notification().unwrap();
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used)).unwrap(), 1);
    let head = ring.pop().unwrap().unwrap();
    ring.add_used(head, 1).unwrap();
    assert!(!ring.enable_notification().unwrap());
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used)).unwrap(), 0);
    ring.finish(&mut q, &irq).unwrap();
    assert!(raised(&irq));

    // VRING_AVAIL_F_NO_INTERRUPT: the driver wants none.
    mem.write_obj(1u16, GuestAddress(avail)).unwrap();
    driver.add_chain(&mem, &[(0x9000, 1, true)]);
    let mut ring = Ring::new(&mem, &q).unwrap();
    let head = ring.pop().unwrap().unwrap();
    ring.add_used(head, 1).unwrap();
    ring.finish(&mut q, &irq).unwrap();
    assert!(!raised(&irq));
}

#[test]
fn rings_outside_guest_memory_are_refused() {
    let mem = memory();
    let (_, mut q) = queue(&mem, true);
    q.set_desc_table_address(Some(0xf_fff0), Some(0));
    assert_eq!(Ring::new(&mem, &q).err(), Some(RingError::Outside));
}

#[test]
fn an_available_index_that_runs_ahead_while_notifications_come_on_is_an_error() {
    let mem = memory();
    let (mut driver, q) = queue(&mem, true);
    driver.add_chain(&mem, &[(0x8000, 1, true)]);
    let mut ring = Ring::new(&mem, &q).unwrap();
    assert!(ring.pop().unwrap().is_some());
    assert_eq!(ring.pop().unwrap(), None);
    let avail = driver.rings()[1];
    mem.write_obj(1 + SIZE + 1, GuestAddress(avail + 2))
        .unwrap();
    assert!(ring.enable_notification().unwrap());
    assert_eq!(
        ring.pop(),
        Err(RingError::AvailIndex {
            avail: 1 + SIZE + 1,
            next: 1,
            size: SIZE
        })
    );
}

#[test]
fn draining_with_pop_or_notify_keeps_notifications_off_until_the_ring_is_empty() {
    for event_idx in [false, true] {
        let mem = memory();
        let (mut driver, q) = queue(&mem, event_idx);
        let used = driver.rings()[2];
        let flags = || mem.read_obj::<u16>(GuestAddress(used)).unwrap();
        driver.add_chain(&mem, &[(0x8000, 1, true)]);
        driver.add_chain(&mem, &[(0x9000, 1, true)]);
        let mut ring = Ring::new(&mem, &q).unwrap();
        ring.disable_notification().unwrap();
        assert_eq!(ring.pop_or_notify().unwrap(), Some(0));
        assert_eq!(ring.pop_or_notify().unwrap(), Some(1));
        if !event_idx {
            assert_eq!(flags(), 1, "notifications stay off while chains come");
        }
        assert_eq!(ring.pop_or_notify().unwrap(), None);
        if event_idx {
            assert_eq!(driver.avail_event(&mem), 2, "notify at the next chain");
        } else {
            assert_eq!(flags(), 0, "notifications back on");
        }
    }
}
