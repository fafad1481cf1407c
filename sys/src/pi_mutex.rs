//! A mutex with priority inheritance.

/// A mutex with priority inheritance (`PTHREAD_PRIO_INHERIT`).
///
/// The epoch thread runs at real-time priority and pauses the guest by
/// taking this lock. With an ordinary mutex, a guest thread preempted
/// while holding it stretches the pause by a whole scheduler slice; with
/// priority inheritance the kernel boosts the holder to the waiter's
/// priority until it lets go.
///
/// Invariants: the `pthread_mutex_t` lives in its own heap allocation and
/// never moves after `pthread_mutex_init`; it is destroyed only in `drop`,
/// when no guard can exist (guards borrow the mutex).
pub struct PiMutex<T> {
    raw: Box<std::cell::UnsafeCell<libc::pthread_mutex_t>>,
    data: std::cell::UnsafeCell<T>,
}

// SAFETY: access to `data` is serialised by the pthread mutex.
unsafe impl<T: Send> Send for PiMutex<T> {}
// SAFETY: as above; `&PiMutex` only hands out `data` under the lock.
unsafe impl<T: Send> Sync for PiMutex<T> {}

/// Holds a [`PiMutex`] locked.
pub struct PiGuard<'a, T> {
    mutex: &'a PiMutex<T>,
}

impl<T> PiMutex<T> {
    /// A new unlocked mutex holding `data`.
    ///
    /// # Panics
    /// If the C library cannot create a priority-inheriting mutex.
    pub fn new(data: T) -> Self {
        // SAFETY: a zeroed pthread_mutex_t is valid storage for init.
        let raw = Box::new(std::cell::UnsafeCell::new(unsafe { std::mem::zeroed::<libc::pthread_mutex_t>() }));
        // SAFETY: attr is initialised before use and destroyed after; the
        // mutex storage is heap-allocated and stays put.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_mutexattr_init(&mut attr), 0, "pthread_mutexattr_init");
            assert_eq!(libc::pthread_mutexattr_setprotocol(&mut attr, libc::PTHREAD_PRIO_INHERIT), 0, "PTHREAD_PRIO_INHERIT");
            assert_eq!(libc::pthread_mutex_init(raw.get(), &attr), 0, "pthread_mutex_init");
            libc::pthread_mutexattr_destroy(&mut attr);
        }
        Self { raw, data: std::cell::UnsafeCell::new(data) }
    }

    /// Blocks until the lock is held.
    pub fn lock(&self) -> PiGuard<'_, T> {
        // SAFETY: the mutex was initialised in `new` and is not destroyed
        // while `self` is borrowed.
        let rc = unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        assert_eq!(rc, 0, "pthread_mutex_lock");
        PiGuard { mutex: self }
    }
}

impl<T> Drop for PiMutex<T> {
    fn drop(&mut self) {
        // SAFETY: no guard exists (they borrow self), so it is unlocked.
        unsafe {
            libc::pthread_mutex_destroy(self.raw.get());
        }
    }
}

impl<T> std::ops::Deref for PiGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the lock is held for the guard's life.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> std::ops::DerefMut for PiGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the lock is held, and `&mut self` makes this unique.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for PiGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this thread holds the lock.
        unsafe {
            libc::pthread_mutex_unlock(self.mutex.raw.get());
        }
    }
}
