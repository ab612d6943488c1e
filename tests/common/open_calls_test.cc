// OpenCalls: the count follows Opened / Released; WaitDrained gives up at
// its deadline while a call is open, returns only `linger` after the last
// release, and waits for a call that opens during the linger.
#include "common/open_calls.h"

#include <thread>

#include "gtest/gtest.h"

namespace spear {
namespace {

TEST(OpenCalls, CountsAndGivesUpAtTheDeadline) {
  OpenCalls c;
  EXPECT_EQ(c.count(), 0);
  EXPECT_TRUE(c.WaitDrained(absl::ZeroDuration(), absl::Now()));  // none ever opened
  c.Opened();
  c.Opened();
  EXPECT_EQ(c.count(), 2);
  const absl::Time start = absl::Now();
  EXPECT_FALSE(c.WaitDrained(absl::Milliseconds(10), start + absl::Milliseconds(50)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
  c.Released();
  EXPECT_FALSE(c.WaitDrained(absl::Milliseconds(10), absl::Now() + absl::Milliseconds(20)));
  c.Released();
  EXPECT_EQ(c.count(), 0);
}

TEST(OpenCalls, LingersAfterTheLastRelease) {
  OpenCalls c;
  c.Opened();
  absl::Time released;
  std::thread t([&] {
    absl::SleepFor(absl::Milliseconds(30));
    released = absl::Now();
    c.Released();
  });
  EXPECT_TRUE(c.WaitDrained(absl::Milliseconds(100), absl::Now() + absl::Seconds(30)));
  const absl::Time end = absl::Now();
  t.join();
  EXPECT_GE(end - released, absl::Milliseconds(100));
  // The deadline cuts the linger short, and no call is open: true.
  c.Opened();
  c.Released();
  const absl::Time start = absl::Now();
  EXPECT_TRUE(c.WaitDrained(absl::Seconds(30), start + absl::Milliseconds(20)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST(OpenCalls, WaitsForACallOpenedDuringTheLinger) {
  OpenCalls c;
  c.Opened();
  c.Released();
  absl::Time second_release;
  std::thread t([&] {
    absl::SleepFor(absl::Milliseconds(20));  // inside the 200 ms linger
    c.Opened();
    absl::SleepFor(absl::Milliseconds(300));  // past the first linger's end
    second_release = absl::Now();
    c.Released();
  });
  EXPECT_TRUE(c.WaitDrained(absl::Milliseconds(200), absl::Now() + absl::Seconds(30)));
  const absl::Time end = absl::Now();
  t.join();
  EXPECT_GE(end - second_release, absl::Milliseconds(200));
}

}  // namespace
}  // namespace spear
