# Configure a Redmine test instance for the mdr-connector tests.
#
# Run through `rails runner` (RAILS_ENV=production) by .ci/redmine.py, which
# feeds this file on stdin. Every step finds or creates its record, so a second
# run changes nothing and returns the same API keys. The result is printed as
# one JSON line after the MDR_REDMINE_STATE marker, because Rails may print
# warnings on stdout too.

require 'json'
require 'securerandom'

PROJECT_IDENTIFIER = 'sec'
ROLE_NAME = 'MDR connector'
GROUP_NAME = 'SOC Leads'
CUSTOM_FIELD_NAME = 'MDR incident id'

# Redmine 5.0 has no permission of its own for issue attachments: view_issues
# lets a member download them, and add_issues, edit_issues and add_issue_notes
# each allow uploads.
ROLE_PERMISSIONS = %i[
  view_issues add_issues edit_issues add_issue_notes
  edit_own_issue_notes view_private_notes set_notes_private
  view_issue_watchers add_issue_watchers
].freeze

def ensure_user(login, firstname, lastname, admin:)
  user = User.find_by_login(login) || User.new
  user.login = login
  user.firstname = firstname
  user.lastname = lastname
  user.mail = "#{login}@example.invalid" if user.mail.blank?
  user.admin = admin
  user.status = User::STATUS_ACTIVE
  user.mail_notification = 'none'
  if user.new_record?
    # No one logs in with this random password, because the tests use API keys.
    user.password = SecureRandom.hex(24)
    user.password_confirmation = user.password
  end
  user.save!
  user
end

def ensure_role
  role = Role.find_by(name: ROLE_NAME) || Role.new(name: ROLE_NAME)
  role.permissions = ROLE_PERMISSIONS
  role.issues_visibility = 'all'
  role.assignable = true
  role.save!
  role
end

# Allow every status change on every tracker for the role, so the tests can
# move an issue to any status without depending on Redmine's default workflow.
def ensure_workflow(role)
  statuses = IssueStatus.all.to_a
  Tracker.all.each do |tracker|
    ([0] + statuses.map(&:id)).each do |old_status_id|
      statuses.each do |new_status|
        next if new_status.id == old_status_id

        WorkflowTransition.find_or_create_by!(
          tracker_id: tracker.id, role_id: role.id,
          old_status_id: old_status_id, new_status_id: new_status.id,
          author: false, assignee: false
        )
      end
    end
  end
end

def ensure_project
  project = Project.find_by(identifier: PROJECT_IDENTIFIER) || Project.new(identifier: PROJECT_IDENTIFIER)
  project.name = 'Security operations' if project.name.blank?
  project.is_public = false
  project.save!
  project.enabled_module_names = (project.enabled_module_names | %w[issue_tracking files])
  project.trackers = Tracker.all.to_a
  project.save!
  project
end

def ensure_member(project, principal, role)
  member = Member.find_by(project_id: project.id, user_id: principal.id)
  if member.nil?
    member = Member.new(project: project, principal: principal)
    member.role_ids = [role.id]
  else
    member.role_ids = (member.role_ids | [role.id])
  end
  member.save!
end

def ensure_group(name, users)
  group = Group.find_by(lastname: name) || Group.new(lastname: name)
  group.save!
  users.each { |user| group.users << user unless group.users.include?(user) }
  group
end

def ensure_custom_field
  field = IssueCustomField.find_by(name: CUSTOM_FIELD_NAME) || IssueCustomField.new(name: CUSTOM_FIELD_NAME)
  field.field_format = 'string'
  field.is_for_all = true
  field.is_filter = true
  field.searchable = true
  field.visible = true
  field.is_required = false
  field.tracker_ids = Tracker.pluck(:id)
  field.save!
  field
end

def user_state(user)
  {id: user.id, login: user.login, name: user.name, api_key: user.api_key}
end

Setting.rest_api_enabled = '1'
Setting.issue_group_assignment = '1'

# A person's issue in the project, as any Redmine in use has: a custom field
# for all projects shows to a non-admin only on issues, and the connector
# finds its correlation field that way on a server without other issues.
def ensure_welcome_issue(project, author)
  return if Issue.where(project_id: project.id).exists?

  Issue.create!(
    project: project,
    tracker: project.trackers.first,
    author: author,
    subject: 'Welcome to the SOC project',
    description: 'Created by the test set-up, so the project is not empty.'
  )
end

service = ensure_user('mdr-connector', 'MDR', 'Connector', admin: false)
human = ensure_user('soc-analyst', 'SOC', 'Analyst', admin: false)
admin = ensure_user('mdr-test-admin', 'Test', 'Admin', admin: true)

role = ensure_role
ensure_workflow(role)
project = ensure_project
group = ensure_group(GROUP_NAME, [human])
[service, human, group].each { |principal| ensure_member(project, principal, role) }
field = ensure_custom_field
ensure_welcome_issue(project, human)

state = {
  redmine_version: Redmine::VERSION.to_s,
  service_user: user_state(service),
  human_user: user_state(human),
  admin_user: user_state(admin),
  project: {id: project.id, identifier: project.identifier, name: project.name},
  role: {id: role.id, name: role.name, permissions: role.permissions.map(&:to_s)},
  group: {id: group.id, name: group.lastname},
  custom_field: {id: field.id, name: field.name},
  trackers: Tracker.sorted.map { |tracker| [tracker.name, tracker.id] }.to_h,
  statuses: IssueStatus.sorted.map { |status| [status.name, {id: status.id, is_closed: status.is_closed}] }.to_h,
  attachment_max_size_kb: Setting.attachment_max_size.to_i,
}
puts "MDR_REDMINE_STATE #{state.to_json}"
