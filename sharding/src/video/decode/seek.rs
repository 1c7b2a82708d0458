//! Reaching a target time: the keyframe before it, seeking there or
//! decoding forward, and turning the frame shown at that time into RGB.

use super::*;

impl Sampler {
    /// The keyframe to decode from for `target`: the last one that starts
    /// at or before it. The index gives decode times (DTS); a keyframe's
    /// presentation time can be later (B-frames are decoded after the
    /// keyframe that follows them), so a keyframe known to be shown after
    /// the target is passed over.
    pub(super) fn keyframe_for(&self, target: i64) -> Option<usize> {
        let mut i = self.keyframes.partition_point(|k| k.dts <= target);
        while i > 0 {
            i -= 1;
            if self.keyframes[i].pts.is_none_or(|p| p <= target) {
                return Some(i);
            }
        }
        None
    }

    /// Finds the frame shown at `target`: decodes forward, seeking first
    /// when a keyframe lies between the current position and the target. It
    /// ends in `held` (the last frame at or before the target) or, when the
    /// first frame starts after the target, in `pending`.
    pub(super) fn exact(&mut self, target: i64) -> Result<Option<Slot>, Reject> {
        let key = self.keyframe_for(target);
        let seek = match (key, self.position) {
            // Decoding from the keyframe is shorter than from here.
            (Some(k), Some(pos)) => {
                let kf = &self.keyframes[k];
                kf.pts.unwrap_or(kf.dts) > pos
            }
            (Some(k), None) => k > 0,
            // No index: seek only for targets far ahead of the position.
            (None, Some(pos)) => (target - pos) as f64 * self.time_base > 10.0,
            (None, None) => false,
        };
        self.goal = Some(target);
        if seek {
            self.seek_before(target)?;
        }
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.next_frame()? {
                    Some(f) => f,
                    None => return Ok(self.held.is_some().then_some(Slot::Held)),
                },
            };
            if stamp(&frame).unwrap_or(i64::MIN) <= target {
                self.held = Some(frame);
            } else {
                self.pending = Some(frame);
                return Ok(Some(if self.held.is_some() {
                    Slot::Held
                } else {
                    Slot::Pending
                }));
            }
        }
    }

    /// Seeks to the keyframe shown at or before `target` and decodes its
    /// first frame into `pending`. Demuxers seek by presentation time, but
    /// only approximately (MP4 shifts the target by the stream's B-frame
    /// delay, and a keyframe can be shown later than that): when the frame
    /// comes out after the target, step back one keyframe. What is learned
    /// about keyframes' presentation times is kept for later decisions.
    pub(super) fn seek_before(&mut self, target: i64) -> Result<(), Reject> {
        let mut ts = target;
        let mut previous_landing = None;
        loop {
            self.seek_to(ts)?;
            let first = self.next_frame()?;
            let pts = first.as_ref().and_then(stamp);
            let landed = self.landed;
            self.pending = first;
            if let (Some(p), Some(d)) = (pts, landed)
                && let Some(k) = self.keyframes.iter_mut().find(|k| k.dts == d)
            {
                k.pts = Some(p);
            }
            match (pts, landed) {
                (Some(p), Some(d))
                    if p > target
                        && previous_landing.is_none_or(|prev| d < prev)
                        && self.keyframes.first().is_some_and(|k| k.dts < d) =>
                {
                    previous_landing = Some(d);
                    ts = d - 1;
                }
                _ => return Ok(()),
            }
        }
    }

    /// The keyframe nearest `target` (approximate mode); falls back to the
    /// exact frame when the container has no index.
    pub(super) fn nearest_keyframe(&mut self, target: i64) -> Result<Option<Slot>, Reject> {
        if self.keyframes.is_empty() {
            return self.exact(target);
        }
        self.seek_before(target)?;
        let before = self.pending.as_ref().and_then(stamp);
        if let (Some(p), Some(d)) = (before, self.landed) {
            // The next keyframe, shown about as much after its decode time
            // as this one.
            let next = self.keyframes.iter().find(|k| k.dts > d).copied();
            if let Some(next) = next {
                let at = next.pts.unwrap_or(next.dts + (p - d));
                if at - target < target - p {
                    self.seek_to(at)?;
                    if let Some(f) = self.next_frame()? {
                        self.pending = Some(f);
                    }
                }
            }
        }
        self.held = self.pending.take();
        Ok(self.held.is_some().then_some(Slot::Held))
    }

    pub(super) fn seek_to(&mut self, ts: i64) -> Result<(), Reject> {
        // `Input::seek` takes AV_TIME_BASE units; round up so that a target
        // exactly on a keyframe does not land on the one before.
        let us = ((ts as f64) * self.time_base * f64::from(ff::ffi::AV_TIME_BASE)).ceil() as i64;
        self.input.seek(us, ..us).map_err(|e| {
            (
                QuarantineReason::CorruptMedia,
                format!("seek to {:.3} s failed: {e}", ts as f64 * self.time_base),
            )
        })?;
        self.decoder.flush();
        self.landed = None;
        self.max_sent = None;
        self.pending = None;
        self.held = None;
        self.position = None;
        self.eof = false;
        Ok(())
    }

    /// The next decoded frame in presentation order; `None` at the end.
    /// Corrupt packets are skipped: what decodes around them is kept.
    pub(super) fn next_frame(&mut self) -> Result<Option<ff::frame::Video>, Reject> {
        let mut frame = ff::frame::Video::empty();
        let mut errors = 0;
        loop {
            match self.decoder.receive_frame(&mut frame) {
                Ok(()) => {
                    self.decoded += 1;
                    self.position = stamp(&frame).or(self.position);
                    return Ok(Some(frame));
                }
                Err(ff::Error::Eof) => return Ok(None),
                Err(ff::Error::Other { errno }) if errno == ff::error::EAGAIN => {}
                Err(_) => {}
            }
            if self.eof {
                return Ok(None);
            }
            let mut packet = ff::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {
                    errors = 0;
                    if packet.stream() == self.stream {
                        if self.landed.is_none() {
                            self.landed = packet.dts();
                        }
                        self.send(&packet);
                    }
                }
                Err(ff::Error::Eof) => {
                    self.eof = true;
                    let _ = self.decoder.send_eof();
                }
                Err(_) => {
                    errors += 1;
                    if errors > 64 {
                        self.eof = true;
                        let _ = self.decoder.send_eof();
                    }
                }
            }
        }
    }

    /// Sends a packet to the decoder. A frame that cannot be the answer
    /// (a frame shown later but still at or before the target was already
    /// sent) is not decoded when nothing refers to it: skipping
    /// non-reference B-frames halves the work of decoding up to a target,
    /// and the reference frames that are kept decode exactly as before.
    pub(super) fn send(&mut self, packet: &ff::Packet) {
        let pts = packet.pts();
        let skip = match (self.goal, pts, self.max_sent) {
            (Some(goal), Some(p), Some(max)) => p < max && max <= goal,
            _ => false,
        };
        self.decoder.skip_frame(if skip {
            ff::Discard::NonReference
        } else {
            ff::Discard::Default
        });
        // Undecodable data is skipped: what decodes around it is kept.
        let _ = self.decoder.send_packet(packet);
        if let (Some(goal), Some(p)) = (self.goal, pts)
            && p <= goal
        {
            self.max_sent = Some(self.max_sent.map_or(p, |m| m.max(p)));
        }
    }

    pub(super) fn convert(&mut self, frame: &ff::frame::Video, ts: i64) -> Result<Frame, Reject> {
        let (fmt, w, h) = (frame.format(), frame.width(), frame.height());
        let fail = |e: ff::Error| {
            (
                QuarantineReason::CorruptMedia,
                format!("pixel format {fmt:?} ({w}x{h}) to RGB: {e}"),
            )
        };
        if self
            .scaler
            .as_ref()
            .is_none_or(|(f, sw, sh, _)| (*f, *sw, *sh) != (fmt, w, h))
        {
            let ctx = scaling::Context::get(
                fmt,
                w,
                h,
                Pixel::RGB24,
                w,
                h,
                scaling::Flags::BILINEAR
                    | scaling::Flags::ACCURATE_RND
                    | scaling::Flags::FULL_CHR_H_INT,
            )
            .map_err(fail)?;
            self.scaler = Some((fmt, w, h, ctx));
        }
        let mut rgb = ff::frame::Video::empty();
        let (.., scaler) = self.scaler.as_mut().expect("set above");
        scaler.run(frame, &mut rgb).map_err(fail)?;
        let stride = rgb.stride(0);
        let data = rgb.data(0);
        let mut packed = Vec::with_capacity((w * h * 3) as usize);
        for row in data.chunks(stride).take(h as usize) {
            packed.extend_from_slice(&row[..(w * 3) as usize]);
        }
        let (packed, width, height) = rotate(packed, w, h, self.rotation);
        let timestamp_ms = self.millis(ts);
        let index = (timestamp_ms as f64 / 1000.0 * self.fps).round().max(0.0) as u32;
        Ok(Frame {
            rgb: packed,
            width,
            height,
            index,
            timestamp_ms,
        })
    }
}
