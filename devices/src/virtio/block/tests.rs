//! virtio-blk driven through the mmio transport by the test driver, on a
//! temporary file, with plain guest memory: every case with each engine,
//! then what only the asynchronous engine does.

mod sync {
    const ENGINE: crate::virtio::block::IoEngine = crate::virtio::block::IoEngine::Sync;
    include!("cases.rs");
}

mod uring {
    const ENGINE: crate::virtio::block::IoEngine = crate::virtio::block::IoEngine::Async;
    include!("cases.rs");

    #[test]
    fn requests_wait_in_flight_until_their_completions_are_served() {
        let mut r = rig("in-flight", false);
        add_reads(&mut r, 8);
        r.transport.process_queue(0);
        assert!(r.transport.backend_wanted(), "completions to wait for");
        wait_for_completions(&mut r.transport);
        assert_eq!(r.driver.queues[0].take_used(&r.mem).len(), 8);
        assert_reads_done(&r, 8);
        assert_eq!(r.irq.status() & 1, 1);
    }

    #[test]
    fn more_requests_than_the_engine_has_room_for_wait_their_turn() {
        let mut r = rig_with("no-room", |file| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            let mut block = Block::with_engine(file, DISK_SIZE, false, "", ENGINE).unwrap();
            block.uring = Some(crate::virtio::block::uring::Uring::new(fd, 3).unwrap());
            block
        });
        add_reads(&mut r, 20);
        r.transport.process_queue(0);
        wait_for_completions(&mut r.transport);
        assert_eq!(r.driver.queues[0].take_used(&r.mem).len(), 20);
        assert_reads_done(&r, 20);
    }

    /// A rig whose engine has 3 slots, with 3 reads and behind them more
    /// GET_IDs (which need no slot) than REQUEST_BUDGET made available;
    /// returns it with the number of requests.
    fn full_engine_and_more_than_a_budget(name: &str) -> (Rig, u64) {
        let mut r = rig_with(name, |file| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            let mut block = Block::with_engine(file, DISK_SIZE, false, "", ENGINE).unwrap();
            block.uring = Some(crate::virtio::block::uring::Uring::new(fd, 3).unwrap());
            block
        });
        add_reads(&mut r, 3);
        let ids = u64::from(REQUEST_BUDGET) + 6;
        let get_id = 0xa_0000;
        r.mem
            .write_obj(
                virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID,
                GuestAddress(get_id),
            )
            .unwrap();
        for i in 3..3 + ids {
            r.mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            r.driver.queues[0].add_chain(
                &r.mem,
                &[
                    (get_id, 16, false),
                    (DATA + 32 * i, 20, true),
                    (STATUS + i, 1, true),
                ],
            );
        }
        (r, 3 + ids)
    }

    /// Serves the queue's eventfd and the engine's as an event loop does,
    /// then checks that all `total` requests completed.
    fn event_loop_completes(r: &mut Rig, total: u64) {
        let event = r.transport.queue_events()[0].try_clone().unwrap();
        for _ in 0..10_000 {
            if event.read().is_ok() {
                r.transport.process_queue(0);
            } else if r.transport.backend_wanted() {
                wait_for_completions(&mut r.transport);
            } else {
                break;
            }
        }
        assert_eq!(r.driver.queues[0].take_used(&r.mem).len() as u64, total);
        for i in 0..total {
            let s: u8 = r.mem.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(s, OK, "request {i}");
        }
    }

    #[test]
    fn a_full_engine_and_the_budget_together_still_serve_every_request() {
        // The queue is taken up again when the reads complete, that stops
        // at the budget, and then the transport must signal the queue
        // again, or the rest would wait for a notification the driver has
        // no reason to send.
        let (mut r, total) = full_engine_and_more_than_a_budget("no-room-budget");
        r.transport.process_queue(0);
        event_loop_completes(&mut r, total);
    }

    #[test]
    fn quiescing_a_full_engine_leaves_the_rest_of_the_queue_to_the_event_loop() {
        // As above, with the completions taken by a quiesce (a snapshot)
        // instead of the event loop.
        let (mut r, total) = full_engine_and_more_than_a_budget("quiesce-budget");
        r.transport.process_queue(0);
        r.transport.quiesce();
        assert!(!r.transport.backend_wanted());
        event_loop_completes(&mut r, total);
    }

    #[test]
    fn a_reset_waits_for_requests_in_flight_and_hands_none_back() {
        let mut r = rig("reset-in-flight", false);
        add_reads(&mut r, 8);
        r.transport.process_queue(0);
        crate::virtio::test_driver::write32(&mut r.transport, 0x070, 0);
        assert!(!r.transport.backend_wanted());
        assert!(r.driver.queues[0].take_used(&r.mem).is_empty());
        // What the reads brought in was waited for, not left to land later.
        for i in 0..8u64 {
            let b: u8 = r.mem.read_obj(GuestAddress(DATA + 512 * i)).unwrap();
            assert_eq!(b, i as u8, "request {i}");
        }
        // The device works again once the driver sets it up again.
        r.reinit();
        assert_eq!(r.request(0, 3, 512, true).0, OK);
    }

    #[test]
    fn quiescing_hands_back_every_request_in_flight() {
        let mut r = rig("quiesce", false);
        add_reads(&mut r, 8);
        r.transport.process_queue(0);
        r.transport.quiesce();
        assert!(!r.transport.backend_wanted());
        assert_eq!(r.driver.queues[0].take_used(&r.mem).len(), 8);
        assert_reads_done(&r, 8);
    }

    #[test]
    fn a_new_backing_file_serves_the_requests_after_it() {
        let mut r = rig("replace", false);
        let (path, file) = temp_disk("replace-new", &[0x5a; DISK_SIZE as usize]);
        r.transport.quiesce();
        let block = r
            .transport
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Block>()
            .unwrap();
        block.replace_backing(file, DISK_SIZE).unwrap();
        assert_eq!(r.request(0, 7, 512, true).0, OK);
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 0x5a);
        std::fs::remove_file(path).unwrap();
    }
}
