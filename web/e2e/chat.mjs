// What the chat runs (run.mjs, features.mjs, conversations.mjs, oidc.mjs) do to the page as a
// person would: sign in with a pasted token, pick from a picker, send a message, wait for the
// answer to finish.

import { STEP, assert } from './harness.mjs';

/** Opens the relay's page and signs in with a pasted client token. */
export async function signIn(page, relay, token) {
  await page.goto(`${relay}/`);
  await page.getByLabel(/client token/i).fill(token);
  await page.getByRole('button', { name: 'Sign in with this token' }).click();
  await page.getByTestId('new-chat').waitFor({ timeout: STEP });
}

/** The last text each page was given to send, for `finished`. */
const lastSent = new WeakMap();

/** Types `text` in the message box and presses Enter. */
export async function send(page, text) {
  lastSent.set(page, text);
  await page.getByTestId('input').fill(text);
  await page.getByTestId('input').press('Enter');
}

/** Waits until the answer to the last message sent is finished and returns its text. Send
 * being back is not enough: right after Enter the page may not have taken the message yet
 * (Send is still there, next to the previous answer), or may show the new answer empty before
 * its first token. So: that message is the last question shown, no answer is streaming, Send is
 * back, and the answer has text. */
export async function finished(page) {
  const question = (lastSent.get(page) ?? '').split('\n')[0].trim();
  await page
    .waitForFunction(
      (question) => {
        const questions = document.querySelectorAll('[data-testid="msg-user"]');
        const asked = questions[questions.length - 1]?.textContent ?? '';
        const answers = document.querySelectorAll('[data-testid="answer"]');
        const answer = answers[answers.length - 1]?.textContent ?? '';
        return (
          asked.includes(question) &&
          !document.querySelector('.msg .cursor') &&
          document.querySelector('[data-testid="send"]') &&
          answer.trim() !== ''
        );
      },
      question,
      { timeout: STEP },
    )
    .catch(async () => {
      const answer = await page.getByTestId('answer').last().innerText().catch(() => '(none)');
      assert(false, `no finished answer to ${JSON.stringify(question)} within ${STEP} ms; the last answer: ${answer}`);
    });
  return page.getByTestId('answer').last().innerText();
}

/** Picks the first option of picker `testId` whose value or label matches `pattern`, waiting
 * for it to be offered (the lists come from the relay). */
export async function choose(page, testId, pattern) {
  const select = page.getByTestId(testId);
  await select.waitFor({ timeout: STEP });
  const deadline = Date.now() + STEP;
  for (;;) {
    const options = await select.locator('option').evaluateAll((os) => os.map((o) => [o.value, o.textContent]));
    const hit = options.find(([value, label]) => pattern.test(value) || pattern.test(label));
    if (hit) {
      await select.selectOption(hit[0]);
      return hit;
    }
    assert(Date.now() < deadline, `${testId} never offered ${pattern}: ${JSON.stringify(options)}`);
    await page.waitForTimeout(200);
  }
}
